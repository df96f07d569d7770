"""Latency and throughput of `ec2train serve` at its defaults against the classic endpoint script's way.

Five servers on the same model file, the same HTTP stack (starlette + uvicorn) and the same
photo-sized JPEGs, each in its own process:

  ec2train    `ec2train serve --model M`: every setting at its default (batching, thread plan,
              the eager forward pass)
  compiled    `ec2train serve --compile auto`: the same, with the forward pass compiled for
              each batch size before it serves
  unbatched   `ec2train serve --max-batch 1` (the thread plan still applies)
  classic     the starter endpoint script's handler: network and transform rebuilt by hand,
              full-size decode, one forward pass per request in the request's own thread,
              torch's default threads (as the script ships)
  classic-1t  the same handler pinned to OMP_NUM_THREADS=1: the classic script at its best on a
              small or shared box (hand-tuned; the defaults above are what users get)

Each is driven at concurrency 1 and 8 by keep-alive HTTP clients, in interleaved rounds,
first on the idle box and then with --busy N CPU-spinning processes beside it (one run
measures both); the tables show answered (200) requests/s, p50/p99 latency and top-1 accuracy (a check
that all did the same work), then ratios against both classic servers. With no --model, a
tiny resnet18 at 64 px is trained on demo data first (and reused on the next run).

    python bench/serve_bench.py                       # 4-6 minutes on 2 cores (1-2 compiling, the first time)
    python bench/serve_bench.py --busy 3              # a heavier neighbour
    python bench/serve_bench.py --model TrainedModels/model.pth --image-size 224
"""

from __future__ import annotations

import argparse
import http.client
import io
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_busy_option, busy_levels, level_name, load_note, spinning  # noqa: E402

# ---------------------------------------------------------------- the classic handler (baseline)


def classic_app(model_path: str):
    """The way the classic endpoint script serves: everything by hand, per request."""
    import torch
    from PIL import Image
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import Response
    from starlette.routing import Route
    from torch import nn
    from torchvision import models, transforms

    # Rebuilt by hand: the architecture, the head and the input size must be typed to match
    # training (here they are read from the file only so the bench works for any size).
    saved = torch.load(model_path, map_location="cpu", weights_only=True)
    size, num_classes = int(saved["image_size"]), int(saved["num_classes"])
    model = models.resnet18(weights=None)
    model.fc = nn.Linear(512, num_classes)
    model.load_state_dict(saved["state_dict"])
    model.eval()

    def input_fn(body: bytes):
        transform = transforms.Compose(
            [
                transforms.Resize((size, size)),
                transforms.ToTensor(),
                transforms.Normalize(saved["mean"], saved["std"]),  # the original had none; kept for equal answers
            ]
        )
        return transform(Image.open(io.BytesIO(body)).convert("RGB")).unsqueeze(0)

    def predict_fn(tensor):
        with torch.no_grad():
            return model(tensor)

    def handle(body: bytes) -> str:
        return json.dumps(predict_fn(input_fn(body)).tolist())  # raw logits, as the original answered

    async def invocations(request):  # each request in its own thread, one forward pass each
        body = await request.body()
        return Response(await run_in_threadpool(handle, body), media_type="application/json")

    def ping(request):
        return Response("{}", media_type="application/json")

    return Starlette(routes=[Route("/ping", ping), Route("/invocations", invocations, methods=["POST"])])


def run_classic(model_path: str, port: int) -> None:
    import uvicorn

    uvicorn.run(classic_app(model_path), host="127.0.0.1", port=port, log_level="warning")


# ---------------------------------------------------------------- set-up


def tiny_model(workdir: Path, image_size: int) -> Path:
    """A resnet18 trained briefly on demo data (reused when already there)."""
    from ec2train.config import resolve
    from ec2train.data import make_demo_dataset
    from ec2train.loop import fit

    out = workdir / f"model-{image_size}"
    if (out / "model.pth").is_file():
        return out / "model.pth"
    data = make_demo_dataset(workdir / "demo", classes=4, per_class=32, size=64, seed=1)
    print(f"training a tiny resnet18 at {image_size} px on {data} ...", flush=True)
    cfg = resolve(
        data=str(data),
        output=str(out),
        logdir=str(workdir / "runs"),
        arch="resnet18",
        weights="none",
        image_size=image_size,
        batch_size=16,
        lr=3e-3,
        workers=0,
        epochs=2,
    )
    return fit(cfg).model_path


def photo_bodies(workdir: Path) -> list[tuple[str, bytes]]:
    """Demo test images as 500x375 JPEGs (a typical dogImages photo size): (class, bytes)."""
    from PIL import Image

    out = []
    for folder in sorted((workdir / "demo" / "test").iterdir()):
        for path in sorted(folder.iterdir())[:4]:
            buf = io.BytesIO()
            Image.open(path).convert("RGB").resize((500, 375)).save(buf, format="JPEG", quality=90)
            out.append((folder.name.split(".", 1)[1], buf.getvalue()))
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, threads: int | None, log: Path) -> subprocess.Popen:
    """A server process. threads=None: no OMP_NUM_THREADS, so the server's defaults decide."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log, "w") as log_file:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_file, env=env)
    deadline = time.monotonic() + 420  # a first compile of each batch size: up to 2 minutes on 2 busy cores
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {' '.join(cmd)}\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server did not answer /ping: {' '.join(cmd)}")


# ---------------------------------------------------------------- load


def drive(port: int, bodies: list[tuple[str, bytes]], labels: list[str], concurrency: int, total: int) -> dict:
    """`total` requests from `concurrency` keep-alive clients; latency percentiles and rate."""
    latencies: list[float] = []
    correct = failures = 0
    lock = threading.Lock()
    counter = itertools.count()

    def client() -> None:
        nonlocal correct, failures
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while (i := next(counter)) < total:
            label, body = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            conn.request("POST", "/invocations", body, {"Content-Type": "image/jpeg"})
            resp = conn.getresponse()
            data = resp.read()
            dt = time.perf_counter() - t0
            answer = json.loads(data) if resp.status == 200 else None
            if isinstance(answer, dict):
                top = answer["predictions"][0]["label"]
            elif isinstance(answer, list):  # classic: raw logits
                row = answer[0]
                top = labels[max(range(len(row)), key=row.__getitem__)]
            else:
                top = None
            with lock:
                latencies.append(dt)
                failures += resp.status != 200
                correct += top == label
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    return {
        "rps": (total - failures) / wall,  # answered requests only: a fast 503 is not served
        "p50": statistics.median(latencies) * 1000,
        "p99": pick(0.99),
        "acc": correct / total,
        "failures": failures,
    }


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model.pth to serve (resnet18; default: train a tiny one)")
    ap.add_argument("--image-size", type=int, default=64, help="input size of the tiny model trained when no --model")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ec2train-serve-bench"))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument(
        "--requests", type=int, default=24, help="requests per client at each concurrency (at least 96 in all)"
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="pass --threads N to the ec2train servers (default: none, so their defaults are measured)",
    )
    add_busy_option(ap)
    ap.add_argument("--classic-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return ap.parse_args()


def servers(model: Path, threads: int | None) -> dict[str, tuple[list[str], int | None]]:
    """name -> (command without its port, OMP_NUM_THREADS or None)."""
    py = sys.executable
    ours = [py, "-m", "ec2train", "serve", "--model", str(model), "--log-level", "warning"]
    ours += ["--threads", str(threads)] if threads else []
    classic = [py, __file__, "--model", str(model), "--classic-server"]
    return {
        "ec2train": (ours, None),
        "compiled": (ours + ["--compile", "auto"], None),
        "unbatched": (ours + ["--max-batch", "1"], None),
        "classic": (classic, None),
        "classic-1t": (classic, 1),
    }


def measure(ports, bodies, labels, args) -> dict[tuple[int, str, int], dict]:
    """(busy, server, concurrency) -> the fastest round's result; rounds interleave the servers."""
    results: dict[tuple[int, str, int], dict] = {}
    for busy in busy_levels(args.busy):
        with spinning(busy):
            print(f"{level_name(busy)}: {load_note()}", flush=True)
            for rnd in range(args.rounds):
                for c in args.concurrency:
                    for name, port in ports.items():
                        r = drive(port, bodies, labels, c, max(96, c * args.requests))
                        print(
                            f"  round {rnd + 1} {name:10s} c={c:<3d} {r['rps']:7.1f} req/s  p50 {r['p50']:7.1f} ms  "
                            f"p99 {r['p99']:7.1f} ms",
                            flush=True,
                        )
                        if (busy, name, c) not in results or r["rps"] > results[busy, name, c]["rps"]:
                            results[busy, name, c] = r
    return results


def report(results: dict[tuple[int, str, int], dict], args) -> None:
    print()
    print("| box | server | concurrency | req/s | p50 ms | p99 ms | top-1 acc | failures |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (busy, name, c), r in results.items():
        print(
            f"| {level_name(busy)} | {name} | {c} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | "
            f"{r['acc']:.2f} | {r['failures']} |"
        )
    print()
    print(
        "| box | concurrency | ec2train/classic req/s | ec2train/classic-1t | compiled/classic | unbatched/classic "
        "| p50 classic/ec2train |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    names = ("ec2train", "compiled", "unbatched", "classic", "classic-1t")
    for busy in busy_levels(args.busy):
        for c in args.concurrency:
            e, n, u, k, k1 = (results[busy, name, c] for name in names)
            print(
                f"| {level_name(busy)} | {c} | {e['rps'] / k['rps']:.2f}x | {e['rps'] / k1['rps']:.2f}x | "
                f"{n['rps'] / k['rps']:.2f}x | {u['rps'] / k['rps']:.2f}x | {k['p50'] / e['p50']:.2f}x |"
            )


def main() -> None:
    args = parse_args()
    if args.classic_server:
        return run_classic(args.model, args.classic_server)

    import torch

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else tiny_model(workdir, args.image_size)
    meta = torch.load(model, map_location="cpu", weights_only=True)
    if meta.get("arch") != "resnet18":
        raise SystemExit(f"{model}: the classic baseline rebuilds a resnet18 by hand; this model is {meta.get('arch')}")
    if not (workdir / "demo" / "test").is_dir():
        from ec2train.data import make_demo_dataset

        make_demo_dataset(workdir / "demo", classes=4, per_class=32, size=64, seed=1)
    bodies = photo_bodies(workdir)
    labels = list(meta["class_names"])
    if not {label for label, _ in bodies} <= set(labels):
        print("note: the model's classes are not the demo classes; the accuracy column means nothing")
    print(
        f"model {model} ({meta['arch']}, {meta['image_size']} px, {len(labels)} classes); "
        f"{len(bodies)} JPEGs of 500x375; torch {torch.__version__}, {os.cpu_count()} CPUs; "
        f"ec2train servers at {'--threads ' + str(args.threads) if args.threads else 'their defaults'}",
        flush=True,
    )
    procs, ports = {}, {}
    try:
        for name, (cmd, threads) in servers(model, args.threads).items():  # all up; only the measured one is busy
            ports[name] = port = free_port()
            port_args = [str(port)] if name.startswith("classic") else ["--port", str(port)]
            procs[name] = start(cmd + port_args, port, threads, workdir / f"{name}.log")
            drive(port, bodies, labels, 2, 16)  # warm-up
        results = measure(ports, bodies, labels, args)
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['compiled']}/stats") as resp:
            stats = json.loads(resp.read())
        print(
            f"compiled server: {stats['images']} images in {stats['batches']} forward passes; sizes {stats['batch_sizes']}; "
            f"compiled for batches of {stats['compiled_batch_sizes'] or 'none (eager)'}"
        )
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(30)
    report(results, args)


if __name__ == "__main__":
    main()
