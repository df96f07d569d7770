"""Pictures of TensorBoard's dashboards as a user first sees them, from a headless Chromium.

    python scripts/tensorboard_screenshot.py --logdir runs --out tb        # tb-timeseries.png, tb-hparams.png, ...

It starts `tensorboard --logdir LOGDIR` on a free port of 127.0.0.1, waits until the runs are
loaded, and has Chromium (Debian: `apt-get install -y chromium`) load each dashboard in a fresh
profile and save a screenshot. Nothing leaves the machine: the browser runs with background
networking, component updates and sync off. As root, Chromium needs --no-sandbox, which this
script passes only then. tests/test_tensorboard.py checks the same pages through TensorBoard's
data API; this script is for looking at them (docs/tensorboard-time-series.png came from it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

DASHBOARDS = ("timeseries", "scalars", "images", "hparams")
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tensorboard(logdir: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from tensorboard.main import run_main; run_main()"]
    cmd += ["--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_until_loaded(url: str, proc: subprocess.Popen, timeout: float = 120) -> list[str]:
    """The runs TensorBoard lists, once it lists scalars for at least one of them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"tensorboard exited: {proc.stderr.read().strip().splitlines()[-1:]}")
        try:
            with urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=5) as resp:
                runs = sorted(json.load(resp))
            if runs:
                return runs
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"tensorboard listed no runs with scalars within {timeout:.0f} s: is --logdir right?")


def screenshot(browser: str, url: str, out: Path, width: int, height: int, wait_ms: int) -> None:
    with tempfile.TemporaryDirectory(prefix="tb-shot-") as profile:
        cmd = [browser, "--headless", "--disable-gpu", "--disable-background-networking"]
        cmd += ["--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}"]
        cmd += ["--no-sandbox"] if os.geteuid() == 0 else []
        # Virtual time: the page's scripts run until the dashboard has drawn, without a fixed sleep.
        cmd += [f"--window-size={width},{height}", f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if res.returncode != 0 or not out.is_file():
        sys.exit(f"{browser} took no screenshot of {url}: {res.stderr.strip()[-300:]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", type=Path, default=Path("runs"), help="TensorBoard folder [runs]")
    parser.add_argument("--out", type=Path, default=Path("tensorboard"), help="file prefix: PREFIX-DASHBOARD.png")
    parser.add_argument("--dashboards", nargs="+", choices=DASHBOARDS, default=list(DASHBOARDS))
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--wait-ms", type=int, default=15000, help="virtual time the page gets to draw")
    parser.add_argument("--browser", default=None, help=f"browser binary [first of {', '.join(BROWSERS)} on PATH]")
    args = parser.parse_args(argv)
    browser = args.browser or next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        sys.exit("no Chromium on PATH: apt-get install -y chromium (Debian/Ubuntu), or pass --browser PATH")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_tensorboard(args.logdir, port)
    try:
        runs = wait_until_loaded(url, proc)
        print(f"tensorboard at {url}: {len(runs)} runs with scalars ({', '.join(runs[:4])}{', ...' * (len(runs) > 4)})")
        for name in args.dashboards:
            out = args.out.parent / f"{args.out.name}-{name}.png"
            # forceSVG: the charts draw as SVG, not with WebGL in a worker, which a browser without
            # a GPU may not have drawn when it takes the picture; they look the same.
            page = f"{url}/?forceSVG=true#{name}"
            screenshot(browser, page, out.resolve(), args.width, args.height, args.wait_ms)
            print(f"wrote {out}")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
