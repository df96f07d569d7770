"""What hostile requests cost `ec2train serve`, against ordinary ones (issue 26).

Starts a real `ec2train serve` (uncompiled, every other setting at its default) on 127.0.0.1 and,
one after the other, sends it:

  normal      ordinary 500x375 JPEGs, one at a time: the baseline
  scans       a 44 KB progressive JPEG of 2000x2000 px with 2,000 extra scans (each scan decodes
              the whole image again)
  stray-scans the same JPEG (1000x1000 px, 1,600 scans) with a stray byte before its scans, which
              libjpeg skips (and a walk that stops at the first non-marker byte missed the scans)
  chunks-png  a 4.8 MB PNG of 400,000 chunks (each costs the decoder a round of Python)
  chunks-head a 4.8 MB PNG of 400,000 unknown chunks before its image data (Pillow's opener reads
              each in Python)
  fill-jpeg   a 6 MB JPEG of fill bytes before its first segment (Pillow's opener reads them one
              at a time in Python)
  com-jpeg    a 6 MB JPEG of 1.5 million empty comments before its image
  declared    80 connections that declare a 5 MB body and send none of it (a byte a second), and
              ordinary requests meanwhile
  40mp-png    16 PNGs of 40 megapixels (5 KB each) at once, and ordinary requests meanwhile
  stalled     300 connections that declare a 6.25 MB body, send 2 MB and stall, and ordinary
              requests meanwhile
  one-byte    4 connections sending 400,000 one-byte chunks each

For each it prints the server's CPU seconds per request, its resident memory before, at the peak
and 3 s after, the worst /ping latency while it ran, and how long ordinary requests sent meanwhile
took (and what they got). `--source DIR` serves from another checkout (e.g. an older commit, to
compare); the hostile files and the client are this checkout's (tests/support).

    python bench/hostile_bench.py                         # about 2 minutes on 2 cores
    python bench/hostile_bench.py --source /tmp/ec2train-old
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_bench import tiny_model  # noqa: E402

from tests.support.images import header_flood_jpegs, many_chunk_png, many_scan_jpeg, photo_like, png_of_size  # noqa: E402
from tests.support.serving import (  # noqa: E402
    PingWatch,
    ProcessProbe,
    Trickle,
    http,
    one_byte_chunks,
    post,
    stalled_bodies,
    start_cli_server,
)


class Phase:
    """One row: the server's CPU and memory around a flood, /ping meanwhile."""

    def __init__(self, name: str, url: str, probe: ProcessProbe, requests: int):
        self.name, self.url, self.probe, self.requests = name, url, probe, requests
        self.normal: list[tuple[int, float]] = []
        self.outcome = ""

    def __enter__(self):
        self.before_mb = self.probe.rss_mb()
        self.probe.reset_peak()
        self.cpu = self.probe.cpu_seconds()
        self.ping = PingWatch(self.url).__enter__()
        return self

    def __exit__(self, *exc):
        self.ping.__exit__(*exc)
        self.cpu = self.probe.cpu_seconds() - self.cpu
        self.peak_mb = self.probe.peak_mb()
        time.sleep(3)
        self.after_mb = self.probe.rss_mb()

    def row(self) -> str:
        normal = ", ".join(f"{s} in {t:.1f} s" for s, t in self.normal[:4]) or "-"
        return (
            f"| {self.name} | {self.requests} | {self.cpu / self.requests:.3f} | {self.before_mb:.0f} | "
            f"{self.peak_mb:.0f} | {self.after_mb:.0f} | {self.ping.worst:.2f} | {normal} | {self.outcome} |"
        )


def attempt(url: str, body: bytes, ctype: str, timeout: float = 30) -> tuple[int | str, float]:
    """(status, seconds); a client error (time-out, reset) as its name instead of a status."""
    started = time.monotonic()
    try:
        return post(url + "/invocations", body, ctype, timeout)[0], time.monotonic() - started
    except OSError as exc:
        reason = getattr(exc, "reason", exc)
        return type(reason).__name__, time.monotonic() - started


def normal_meanwhile(phase: Phase, body: bytes, count: int = 4) -> None:
    for _ in range(count):
        phase.normal.append(attempt(phase.url, body, "image/jpeg"))


def statuses(results) -> str:
    counts: dict[str, int] = {}
    for status, *_ in results:
        counts[str(status)] = counts.get(str(status), 0) + 1
    return " ".join(f"{n}x{s}" for s, n in sorted(counts.items()))


def run(model: Path, source: Path) -> list[Phase]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source), os.environ.get("PYTHONPATH", "")])}
    buf = io.BytesIO()
    photo_like(500, 375).save(buf, format="JPEG", quality=90)
    photo = buf.getvalue()
    proc, url = start_cli_server(model, env=env, cwd=str(source))
    probe, port = ProcessProbe(proc.pid), int(url.rsplit(":", 1)[1])
    phases = []
    try:
        for _ in range(5):
            post(url + "/invocations", photo, "image/jpeg")  # warm-up
        with Phase("normal", url, probe, 20) as phase:
            normal_meanwhile(phase, photo, 20)
        phase.outcome = f"p50 {statistics.median(t for _, t in phase.normal) * 1000:.0f} ms"
        phase.normal = phase.normal[:1]
        phases.append(phase)

        floods = header_flood_jpegs()
        for name, body, ctype in (
            ("scans", many_scan_jpeg(2000, 2000, 2000), "image/jpeg"),
            ("stray-scans", many_scan_jpeg(1000, 1000, 1600, gap=b"\x00"), "image/jpeg"),
            ("chunks-png", many_chunk_png(1000, 1000, 400_000), "image/png"),
            ("chunks-head", many_chunk_png(1000, 1000, 400_000, before_data=True), "image/png"),
            ("fill-jpeg", floods["fill bytes"], "image/jpeg"),
            ("com-jpeg", floods["empty comments"], "image/jpeg"),
        ):
            with Phase(name, url, probe, 3) as phase:
                results = [attempt(url, body, ctype, timeout=600) for _ in range(3)]
            phase.outcome = statuses(results)
            phases.append(phase)

        bomb = png_of_size(7300, 5470)
        with Phase("40mp-png", url, probe, 16) as phase, ThreadPoolExecutor(16) as pool:
            flood = [pool.submit(attempt, url, bomb, "image/png", 600) for _ in range(16)]
            time.sleep(0.3)
            normal_meanwhile(phase, photo)
            phase.outcome = statuses(f.result() for f in flood)
        phases.append(phase)

        with Phase("stalled", url, probe, 300) as phase:
            socks = stalled_bodies(port, 300, 6_250_000, 2_000_000)
            normal_meanwhile(phase, photo)
            stats = http(url + "/stats")[1]
            for sock in socks:
                sock.close()
        phase.outcome = f"{stats.get('memory_mb', '-')} MB held" if "memory_mb" in stats else "no budget"
        phases.append(phase)

        with Phase("declared", url, probe, 80) as phase:
            socks = stalled_bodies(port, 80, 5_000_000, 0)
            with Trickle(socks):
                time.sleep(1)
                stats = http(url + "/stats")[1]
                normal_meanwhile(phase, photo)
            for sock in socks:
                sock.close()
        phase.outcome = f"{stats.get('memory_mb', '-')} MB held" if "memory_mb" in stats else "no budget"
        phases.append(phase)

        with Phase("one-byte", url, probe, 4) as phase, ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: one_byte_chunks(port, 400_000), range(4)))
            normal_meanwhile(phase, photo)
        phase.outcome = " ".join(sorted({a[:12].decode(errors="replace") or "closed" for a in answers}))
        phases.append(phase)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    return phases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model file to serve (default: serve_bench's tiny resnet18, trained on demo data)")
    ap.add_argument("--source", default=str(ROOT), help="ec2train checkout to serve from (default: this one)")
    ap.add_argument("--workdir", default="/tmp/ec2train-bench/hostile")
    args = ap.parse_args()
    model = Path(args.model) if args.model else tiny_model(Path(args.workdir), 64)
    source = Path(args.source).resolve()
    print(f"serving {model} from {source}; {os.cpu_count()} CPUs", flush=True)
    phases = run(model, source)
    print()
    print(
        "| flood | requests | server CPU s/request | RSS before MB | peak MB | 3 s after MB | worst /ping s "
        "| ordinary requests meanwhile | answers |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for phase in phases:
        print(phase.row())


if __name__ == "__main__":
    main()
