"""The screenshots in docs/tracking.md, taken with a real browser from runs made here.

    python docs/screenshots.py                      # runs, a sweep, an evaluation, then docs/images/*.png
    python docs/screenshots.py --workdir /tmp/shots --reuse    # screenshots only, of runs made before

Needs Chromium and Playwright's Python package, driving the system browser (no browser download):

    apt-get install -y chromium && pip install playwright

It makes, in --workdir with its own SQLite store: three sine runs (MAML, FOMAML, Reptile), one that diverges
(MAML with algorithm.inner_lr=50), a 4-trial sweep over algorithm.inner_lr and a `metaray eval`; then starts
`metaray ui`, opens the link it prints and saves:

- mlflow-runs.png: the experiment's runs view with its charts, the sweep's trials shown, held-out loss across runs;
- mlflow-sweep-parent.png: the sweep parent's page (the best trial's values, the numbers the sweep compared);
- mlflow-run-evaluation.png: a run's evaluation (results as bars, the adaptation curve).

A few minutes on a 2-core machine (the runs are short: 300 meta-steps).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 860}
COMMON = ["--set", "workers.mode=inprocess", "--set", "eval.tasks=200", "--set", "run.log_every=100",
          "--set", "tracking.system_metrics=false"]


def metaray(*args: str, cwd: Path, check: bool = True) -> str:
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"})
    if check and proc.returncode != 0:
        raise SystemExit(f"metaray {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def make_runs(work: Path, steps: int) -> None:
    """The runs a new user makes first: three algorithms, one diverged run, a sweep, an evaluation."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in ("maml", "fomaml", "reptile"):
        print(f"training sine-{name}", flush=True)
        metaray("train", str(ROOT / "configs" / f"sine-{name}.yaml"), "--set", f"outer.steps={steps}", *COMMON, cwd=work)
    print("training a run that diverges", flush=True)
    metaray("train", str(ROOT / "configs" / "sine-maml.yaml"), "--set", f"outer.steps={steps}", "--set",
            "algorithm.inner_lr=50", "--set", "run.name=sine-maml-lr50", *COMMON, cwd=work, check=False)
    print("sweeping algorithm.inner_lr (4 trials)", flush=True)
    metaray("sweep", str(ROOT / "configs" / "sine-maml.yaml"), "--grid", "algorithm.inner_lr=[0.003, 0.01, 0.03, 0.1]",
            "--set", f"outer.steps={steps}", *COMMON, "--max-concurrent", "2", cwd=work)
    print("evaluating sine-maml again", flush=True)
    metaray("eval", "runs/sine-maml", "--set", "workers.mode=inprocess", cwd=work)


def start_ui(work: Path, port: int) -> tuple[subprocess.Popen, str]:
    ui = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--port", str(port)], cwd=work,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"})
    link = None
    while link is None:
        line = ui.stdout.readline()
        if not line:
            raise SystemExit("metaray ui ended before printing its link")
        match = re.search(r"runs of \S+: (\S+)", line)
        link = match[1] if match else None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return ui, link
        except OSError:
            time.sleep(0.5)
    raise SystemExit("metaray ui did not come up")


def run_ids(work: Path) -> dict[str, str]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("metaray-sine")
    return {r.info.run_name: r.info.run_id for r in client.search_runs([exp.experiment_id])}


def save(page, path: Path) -> None:
    """A screenshot as a 256-colour PNG: the UI's flat colours survive, and the file is a tenth of the size."""
    from PIL import Image

    image = Image.open(io.BytesIO(page.screenshot()))
    image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"{path}: {path.stat().st_size // 1024} KB", flush=True)


def settle(page, text: str, seconds: float = 6.0) -> None:
    """Wait for ``text`` on the page, then for the charts (drawn after their data arrives; the UI keeps polling,
    so the network is never idle), and close MLflow's assistant panel, which takes a third of the page."""
    page.get_by_text(text).first.wait_for(timeout=180_000)
    time.sleep(seconds)
    for close in page.get_by_label("Close").all():
        if close.is_visible():
            close.click(timeout=5_000)
    time.sleep(1)


def charts_of(page, search: str) -> None:
    """Only the charts whose metric names contain ``search`` (the UI's own chart search)."""
    page.get_by_placeholder("Search metric charts").first.fill(search)
    time.sleep(4)


def screenshots(work: Path, out: Path, port: int) -> None:
    from playwright.sync_api import sync_playwright

    ui, link = start_ui(work, port)
    ids = run_ids(work)
    parent = next(name for name in ids if "sweep_" in name)
    base, _, query = link.partition("/runs?")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=BROWSER_ARGS)
            page = browser.new_page(viewport=VIEWPORT)
            # The runs view with its charts, the sweep's trials shown: held-out loss across runs.
            page.goto(f"{link}&compareRunsMode=CHART")
            settle(page, "sine-reptile")
            page.locator("[role=row]").filter(has_text=parent[:12]).locator("button, [role=button]").first.click()
            charts_of(page, "test/loss_step")
            save(page, out / "mlflow-runs.png")
            # The sweep's parent: the best trial's values and the numbers the sweep compared.
            page.goto(f"{base}/runs/{ids[parent]}?{query}")
            settle(page, "best.run")
            page.set_viewport_size({"width": VIEWPORT["width"], "height": 1500})
            page.get_by_text("best.run").first.scroll_into_view_if_needed()
            time.sleep(2)
            save(page, out / "mlflow-sweep-parent.png")
            page.set_viewport_size(VIEWPORT)
            page.goto(f"{base}/runs/{ids['sine-maml']}/model-metrics?{query}")
            settle(page, "Model metrics")
            charts_of(page, "test/loss")
            save(page, out / "mlflow-run-evaluation.png")
            browser.close()
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/metaray-screenshots"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--steps", type=int, default=300, help="meta-steps per run")
    parser.add_argument("--port", type=int, default=5077)
    parser.add_argument("--reuse", action="store_true", help="take the screenshots of the runs made before")
    args = parser.parse_args()
    if not args.reuse:
        make_runs(args.workdir, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    screenshots(args.workdir, args.out, args.port)


if __name__ == "__main__":
    main()
