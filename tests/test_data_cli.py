"""`metaray data convert`: the real command on tiny datasets; user mistakes exit 2 with one line."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
from image_layouts import imagefolder, leftovers, miniimagenet_folder, omniglot_folder, zip_folder

from orchestrator.cli.main import main
from tasks.store import ImageStore


@pytest.mark.slow  # converters and their bad input: test_convert*.py in CI
def test_the_command_converts_good_input_and_rejects_bad_input_in_one_line(tmp_path):
    src = zip_folder(omniglot_folder(tmp_path / "src", {"Greek": 2}), tmp_path / "images_background.zip")
    command = [sys.executable, "-m", "orchestrator.cli", "data", "convert", "omniglot"]
    good = [*command, str(src), str(tmp_path / "o.arrow"), "--size", "12"]
    bad = [*command, str(tmp_path / "missing.zip"), str(tmp_path / "x.arrow")]
    # Both at once: each process pays the CLI's import time, the test only once.
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd in (good, bad)]
    (out_good, err_good), (_, err_bad) = (p.communicate(timeout=300) for p in procs)
    assert procs[0].returncode == 0, err_good
    assert "wrote" in out_good and "2 classes, 8 images" in out_good
    assert ImageStore.open(tmp_path / "o.arrow").image_shape == (1, 12, 12)
    assert procs[1].returncode == 2
    assert err_bad.count("\n") == 1 and "Traceback" not in err_bad
    assert err_bad.startswith("metaray: error: Omniglot source ") and "missing.zip does not exist" in err_bad
    assert leftovers(tmp_path / "x.arrow") == []


def test_flags_reach_the_converters(tmp_path, capsys):
    mini = miniimagenet_folder(tmp_path / "mini", {"train": ["n01"], "val": ["n02"], "test": ["n03"]}, per_class=3)
    assert main(["data", "convert", "miniimagenet", str(mini), str(tmp_path / "m.arrow"), "--size", "8"]) == 0
    assert ImageStore.open(tmp_path / "m.arrow").image_shape == (3, 8, 8)
    # An existing store needs --overwrite; a class below --min-per-class fails, or is skipped with --skip-bad.
    argv = ["data", "convert", "miniimagenet", str(mini), str(tmp_path / "m.arrow"), "--min-per-class", "4"]
    assert main(argv) == 2
    assert "m.arrow already exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 2
    assert "class 'n01' (" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--skip-bad"]) == 2  # every class skipped: nothing to write
    assert "no classes to write" in capsys.readouterr().err
    assert ImageStore.open(tmp_path / "m.arrow").image_shape == (3, 8, 8)  # the old store is untouched

    folder = imagefolder(tmp_path / "f", {"a": 3, "b": 1})
    argv = ["data", "convert", "imagefolder", str(folder), str(tmp_path / "f.arrow"), "--channels", "1",
            "--min-per-class", "2", "--skip-bad"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1 classes, 3 images" in out and "skipped 1 bad images/classes, listed in" in out
    assert (tmp_path / "f.arrow.skipped.txt").read_text().startswith("class 'b'")
    assert ImageStore.open(tmp_path / "f.arrow").image_shape == (1, 84, 84)
    assert main(["data", "convert", "omniglot", str(folder), str(tmp_path / "g.arrow"), "--channels", "3"]) == 2
    assert "--channels applies to imagefolder only" in capsys.readouterr().err


def test_the_parser_rejects_unknown_sources(tmp_path, capsys):
    assert main(["data", "convert", "cifar", str(tmp_path), str(tmp_path / "c.arrow")]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'cifar'" in err and err.count("\n") == 1  # one line, as every usage error


def test_cifar_and_tiered_sources_and_their_bad_input(tmp_path, capsys):
    from pickle_layouts import Exploit, cifar100, tar_gz, tiered

    cifar100(tmp_path / "cifar-100-python")
    archive = tar_gz(tmp_path / "cifar-100-python", tmp_path / "cifar-100-python.tar.gz")
    assert main(["data", "convert", "cifar-fs", str(archive), str(tmp_path / "fs.arrow")]) == 0
    assert "wrote" in capsys.readouterr().out
    store = ImageStore.open(tmp_path / "fs.arrow")
    assert store.image_shape == (3, 32, 32) and sorted(set(store.groups)) == ["test", "train", "val"]
    assert main(["data", "convert", "fc100", str(tmp_path / "cifar-100-python"), str(tmp_path / "fc.arrow"),
                 "--size", "16"]) == 0
    assert ImageStore.open(tmp_path / "fc.arrow").image_shape == (3, 16, 16)
    tiered(tmp_path / "tiered-imagenet", {"train": {"n1": "a"}, "val": {"n2": "b"}, "test": {"n3": "c"}}, size=84)
    tiered_src = str(tmp_path / "tiered-imagenet")
    assert main(["data", "convert", "tieredimagenet", tiered_src, str(tmp_path / "t.arrow")]) == 0
    assert ImageStore.open(tmp_path / "t.arrow").image_shape == (3, 84, 84)
    capsys.readouterr()

    assert main(["data", "convert", "fc100", str(archive), str(archive), str(tmp_path / "x.arrow")]) == 2
    assert "fc100 converts one source, got 2" in capsys.readouterr().err
    (tmp_path / "cifar-100-python" / "meta").write_bytes(pickle.dumps(Exploit(tmp_path / "pwned"), protocol=2))
    assert main(["data", "convert", "cifar-fs", str(tmp_path / "cifar-100-python"), str(tmp_path / "x.arrow")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "meta is not a CIFAR-100 pickle: it names" in err
    assert not (tmp_path / "pwned").exists() and leftovers(tmp_path / "x.arrow") == []


def test_verify_passes_a_sound_store_and_fails_a_tampered_one_in_one_line(tmp_path, capsys):
    folder = imagefolder(tmp_path / "f", {"a": 3, "b": 2}, mode="L")
    assert main(["data", "convert", "imagefolder", str(folder), str(tmp_path / "f.arrow"), "--size", "8",
                 "--channels", "1"]) == 0
    store = ImageStore.open(tmp_path / "f.arrow")
    data = bytearray((tmp_path / "f.arrow").read_bytes())
    data[store.images(1).ctypes.data - store._whole.address + 3] ^= 0x01  # one bit of class 'b'
    (tmp_path / "bad.arrow").write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["data", "verify", str(tmp_path / "f.arrow")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok: {tmp_path / 'f.arrow'}: 2 classes, 5 images") and "format version 2" in out
    assert main(["data", "verify", str(tmp_path / "bad.arrow")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "bad.arrow is corrupt: the pixels of class 'b' do not match the checksum written with them" in err
