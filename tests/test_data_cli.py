"""`metaray data convert`: the real command on tiny datasets; user mistakes exit 2 with one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from image_layouts import imagefolder, leftovers, miniimagenet_folder, omniglot_folder, zip_folder

from orchestrator.cli import main
from tasks.store import ImageStore


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
    with pytest.raises(SystemExit) as e:
        main(["data", "convert", "cifar", str(tmp_path), str(tmp_path / "c.arrow")])
    assert e.value.code == 2 and "invalid choice: 'cifar'" in capsys.readouterr().err
