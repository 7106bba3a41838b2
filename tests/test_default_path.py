"""The contracts on the path users take, Ray with 2 workers: SIGTERM of a real `metaray train` (learner in the
driver, and as its own actor), a corrupt store found by a Ray worker, a crafted store hash, Ray listening on
loopback only, and a full disk."""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from orchestrator import load_config, train
from orchestrator.cli.main import main
from orchestrator.run import checkpoint
from orchestrator.workers.ray_session import local_store
from orchestrator.workers.reaper import MARK, marked
from tasks.store import DataError, ImageStore
from tasks.store_writer import StoreWriter

STEPS = 40


def write_config(tmp_path: Path, name: str, **sections) -> Path:
    cfg = {
        "run": {"name": name, "dir": str(tmp_path / "runs"), "checkpoint_every": 100000, "log_every": 1},
        "task": {"k_shot": 5, "query": 5},
        "model": {"hidden": [16, 16]},
        "outer": {"meta_batch_size": 8, "steps": STEPS},
        "workers": {"mode": "ray", "num_workers": 2},
        "eval": {"tasks": 20, "steps": [0, 1], "batch_tasks": 10},
        "tracking": {"experiment": "default-path", "plots": False, "log_model": False, "log_checkpoint": False,
                     "system_metrics": False, "flush_every_s": 0.2},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def started(config: Path, at_step: int, *args: str) -> tuple[subprocess.Popen, list[str]]:
    """``metaray train config`` in a subprocess (its own embedded Ray), returned once it printed ``step at_step/``."""
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", str(config), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        plain = re.sub(r"\x1b\[[0-9;]*m", "", line)  # Ray colours the name on a learner actor's lines
        if re.match(rf"(\(\S+ pid=\d+\) )?step {at_step}/", plain):
            return proc, lines
    proc.wait()
    raise AssertionError(f"the run ended before step {at_step}: {proc.stderr.read()[-3000:]}")


def only_run(name: str):
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("default-path").experiment_id],
                                f"attributes.run_name = '{name}'")
    return client, run


def test_sigterm_on_ray_stops_at_a_step_boundary_and_resumes_bit_identically(tmp_path, ray_local):
    """What a preempted node, Kubernetes or `ray job stop` sends. Ray's own SIGTERM handler (installed by ray.init)
    aborted the process: exit 134, no checkpoint at the stop, the MLflow run FAILED."""
    config = write_config(tmp_path, "stopped")
    proc, lines = started(config, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err[-3000:]
    step = checkpoint.load(tmp_path / "runs" / "stopped").step
    assert 3 <= step < STEPS  # the interruption's checkpoint: there is no periodic one before the end
    assert f"interrupted: checkpoint at step {step}" in "".join(lines) + out and "--resume" in out
    assert "stopped by SIGTERM" in err and "Traceback" not in err + out
    client, run = only_run("stopped")
    assert run.info.status == "KILLED"

    resumed = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(config), "--resume"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {tmp_path / 'runs' / 'stopped'} at step {step}" in resumed.stdout
    # Uninterrupted, on Ray too (this session's), with the same seed and shares: the same θ, bit for bit.
    whole = train(load_config(config, ["run.name=whole", "tracking.enabled=false"]))
    got = checkpoint.load(tmp_path / "runs" / "stopped").params
    assert all(torch.equal(got[k], whole.params[k]) for k in got)
    client, run = only_run("stopped")
    assert run.info.status == "FINISHED"
    for key in ("meta/loss", "perf/step_s", "orchestrator/faults"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(range(STEPS)), key


@pytest.mark.slow  # ~20 s; CI stops the default path (the learner in the driver) above
def test_sigterm_stops_a_learner_actor_at_a_step_boundary(tmp_path):
    """`workers.learner: actor`: the driver passes the stop on; the actor checkpoints and closes its run."""
    config = write_config(tmp_path, "actor", workers={"learner": "actor"}, outer={"steps": 100000})
    proc, lines = started(config, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert 3 <= checkpoint.load(tmp_path / "runs" / "actor").step < 100000
    assert only_run("actor")[1].info.status == "KILLED"


def write_store(path: Path, classes: int = 6, images: int = 4) -> ImageStore:
    rng = np.random.default_rng(0)
    with StoreWriter(path, (1, 28, 28), source="test", preprocessing="none") as w:
        for c in range(classes):
            w.add_class(f"c{c}", "ab"[c % 2], rng.integers(0, 256, (images, 1, 28, 28), dtype=np.uint8))
    return ImageStore.open(path)


def test_a_corrupt_store_found_by_a_ray_worker_is_one_line_and_exit_2(tmp_path, ray_local, capsys):
    store = write_store(tmp_path / "good.arrow")
    data = bytearray(store.path.read_bytes())
    data[store.images(3).ctypes.data - store._whole.address] ^= 0xFF  # one pixel of class c3
    (tmp_path / "bad.arrow").write_bytes(bytes(data))
    config = write_config(tmp_path, "corrupt", task={"family": "images", "store": str(tmp_path / "bad.arrow"),
                                                     "n_way": 2, "k_shot": 1, "query": 1,
                                                     "split": {"by": "class", "train": 0.5, "test": 0.5}},
                          model={"backbone": "conv4", "width": 8}, tracking={"enabled": False})
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("metaray")]
    assert "Traceback" not in err and "\x1b[" not in err, err  # no remote traceback, no colour codes
    assert line.startswith("metaray: error: ") and "bad.arrow is corrupt: the pixels of class 'c" in line


def test_a_shipped_store_whose_hash_is_not_a_hash_is_refused(tmp_path, ray_local):
    """The hash names the node's cached copy: '../' in it wrote a file outside the data folder."""
    outside = Path(os.environ.get("TMPDIR", "/tmp")) / "escaped.arrow"
    outside.unlink(missing_ok=True)
    crafted = "sha256:/../../../../" + str(outside.with_suffix(""))
    config = {"task": {"store": str(tmp_path / "not-on-this-node.arrow")}}
    with pytest.raises(DataError, match=r"task\.store: refusing to cache a shipped store under the name"):
        local_store(config, [ray_local.put(b"bytes"), crafted])
    assert not outside.exists()
    # Nor does a store with such a hash in its own metadata open.
    store = write_store(tmp_path / "s.arrow")
    crafted = b"sha256:../../../"
    text = store.path.read_bytes().replace(store.content_hash.encode(), crafted + b"x" * (71 - len(crafted)))
    (tmp_path / "crafted.arrow").write_bytes(text)
    with pytest.raises(DataError, match=r"crafted\.arrow is corrupt .*is not sha256:<64 hex digits>"):
        ImageStore.open(tmp_path / "crafted.arrow")


def listening_addresses(pids: list[int]) -> set[str]:
    """Local addresses of the TCP sockets in LISTEN state held by ``pids`` (from /proc)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])
                # /proc prints each 32-bit word of the address in host (little-endian) order
                address = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
                found.add(str(getattr(address, "ipv4_mapped", None) or address))
    return found


def environ(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def test_embedded_ray_listens_on_loopback_only(ray_local):
    """Ray turned the node address 127.0.0.1 into the machine's address, and its servers listened on every
    interface. The session's processes carry the reaper's marker: their sockets are the ones to look at."""
    ray_local.get([ray_local.remote(lambda: 1).remote()])  # a worker process too
    markers = {e.split("=", 1)[1] for p in Path("/proc").glob("[0-9]*") for e in environ(int(p.name))
               if e.startswith(MARK + "=")}
    pids = [pid for m in markers for pid in marked(m)]
    assert len(pids) >= 3  # gcs_server, raylet, a worker at least
    addresses = listening_addresses(pids)
    assert addresses == {"127.0.0.1"}, addresses


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: room for a few checkpoints and metric-log lines, then full."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_stops_the_run_with_one_line_naming_the_last_good_checkpoint(tmp_path, small_disk, capsys,
                                                                                 mlflow_store):
    config = write_config(tmp_path, "full", run={"dir": str(small_disk / "runs"), "checkpoint_every": 5,
                                                 "log_every": 1000},
                          model={"hidden": [40, 40]}, outer={"steps": 100000}, workers={"mode": "inprocess"})
    assert main(["train", str(config)]) == 1
    captured = capsys.readouterr()
    (err,) = [x for x in captured.err.splitlines() if x.startswith("metaray")]
    assert "Traceback" not in captured.err + captured.out, captured.err
    assert err.startswith(f"metaray: failed: no space left on the device of {small_disk}"), err
    saved = checkpoint.load(small_disk / "runs" / "full")  # whole: written atomically
    assert f"the last good checkpoint is {small_disk / 'runs' / 'full' / 'checkpoint.pt'} (step {saved.step})" in err
    assert saved.step > 0 and not list((small_disk / "runs" / "full").glob(".*.tmp-*"))
    assert only_run("full")[1].info.status == "FAILED"  # the store (on another disk) still answers
