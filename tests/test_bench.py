"""`ec2train bench`: three real measurements, and advice that follows from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from ec2train.data import make_demo_dataset
from ec2train.perf import bench, median_short_side, verdict
from tests.support.cli import assert_one_line_error, cli_in_process

BASE = dict(
    device_type="cuda",
    amp="fp16",
    channels_last=True,
    frozen=False,
    workers=3,
    cpus=4,
    median_short_side=300,
    image_size=224,
)


def joined(advice: list[str]) -> str:
    return " | ".join(advice)


@pytest.mark.fast
def test_input_bound_with_big_images_and_a_frozen_backbone():
    bound, advice = verdict(150, 900, 140, **{**BASE, "frozen": True, "median_short_side": 1200})
    assert bound == "input pipeline"
    assert "--cache-features" in advice[0]  # the biggest win first: no decoding after epoch 1
    assert "ec2train data prepare DATA DATA-256 --size 256" in joined(advice)
    assert "more loader workers" not in joined(advice)  # 3 workers of 4 CPUs already


@pytest.mark.fast
def test_input_bound_with_idle_cpus_asks_for_workers_not_prepare():
    bound, advice = verdict(150, 900, 140, **{**BASE, "workers": 0, "cpus": 8, "median_short_side": 300})
    assert bound == "input pipeline"
    assert "--workers 7" in joined(advice)
    assert "data prepare" not in joined(advice)  # images are already small: nothing to gain
    assert "--cache-features" not in joined(advice)  # the backbone trains: features change


@pytest.mark.fast
def test_step_bound_on_a_gpu_without_amp_asks_for_amp_first():
    bound, advice = verdict(2000, 300, 290, **{**BASE, "amp": "off", "channels_last": False})
    assert bound == "training step"
    assert advice[0].startswith("--amp auto") and "--channels-last" in advice[1]
    assert "GPU instance" not in joined(advice)


@pytest.mark.fast
def test_step_bound_on_cpu_says_use_a_gpu():
    bound, advice = verdict(400, 20, 19, **{**BASE, "device_type": "cpu", "amp": "off"})
    assert bound == "training step"
    assert "GPU instance" in advice[0] and "--amp" not in joined(advice)


@pytest.mark.fast
def test_poor_overlap_is_called_out():
    _, advice = verdict(400, 300, 100, **BASE)
    assert "well below both" in advice[-1]
    _, advice = verdict(400, 300, 290, **BASE)
    assert "well below both" not in joined(advice)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return make_demo_dataset(
        tmp_path_factory.mktemp("bench") / "d", classes=3, per_class=8, size=48, eval_per_class=1
    )  # 24 images: whole batches of 4


def test_input_bound_with_a_faster_gpu_loader_advises_it_after_the_feature_cache():
    bound, advice = verdict(150, 900, 140, **{**BASE, "frozen": True}, gpu_loader_ips=600)
    assert bound == "input pipeline"
    assert "--cache-features" in advice[0] and advice[1].startswith("--loader gpu")
    assert "600 img/s here against 150" in advice[1]
    _, advice = verdict(150, 900, 140, **BASE, gpu_loader_ips=160)  # not clearly faster: not advised
    assert "--loader gpu" not in joined(advice)


def test_bench_measures_fit_parts_on_real_data(small_data: Path):
    r = bench(small_data, arch="resnet18", batch_size=4, workers=0, device="cpu", image_size=32, steps=3)
    assert r.pipeline_ips > 0 and r.step_ips > 0 and r.end_to_end_ips > 0
    assert set(r.loaders) == {"cpu", "gpu"} and all(
        x.pipeline_ips > 0 and x.end_to_end_ips > 0 for x in r.loaders.values()
    )
    assert r.loader == "cpu" and r.loader_why == "cpu loader: no GPU"  # what fit --loader auto uses here
    assert r.device == "cpu" and r.amp == "off" and r.frozen
    assert r.median_short_side == 48
    assert r.bound in ("input pipeline", "training step") and r.advice


def test_bench_cli_prints_the_three_rates_and_the_verdict(capsys, small_data: Path):
    code, out, _ = cli_in_process(
        capsys,
        "bench",
        "--data",
        small_data,
        "--arch",
        "resnet18",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--image-size",
        "32",
        "--steps",
        "2",
    )
    assert code == 0
    text = " ".join(out.split())
    for row in (
        "input pipeline alone (cpu loader: workers decode + transform)",
        "input pipeline alone (gpu loader: cpu decodes + transforms)",
        "training step alone",
        "end to end, cpu loader",
        "end to end, gpu loader",
        "fit --loader auto here: cpu loader: no GPU",
        "bound by the",
    ):
        assert row in text


@pytest.mark.fast
def test_bench_bad_data_is_a_one_line_error(capsys, tmp_path: Path):
    code, _, err = cli_in_process(capsys, "bench", "--data", tmp_path / "missing")
    assert_one_line_error(code, err, "does not exist")


def test_median_short_side_reads_headers(small_data: Path):
    from ec2train.data import scan_split

    _, samples = scan_split(small_data, "train")
    assert median_short_side(samples) == 48


def test_gpu_check_says_no_cuda_in_one_line_on_a_cpu_box():
    import subprocess
    import sys

    import torch

    assert not torch.cuda.is_available()  # the build machines have no GPU; this test is for them
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines() == [
        "no CUDA device: bench/gpu_check.py needs an NVIDIA GPU (torch.cuda.is_available() is False here)"
    ], proc.stdout
    assert proc.stderr == ""


def test_busy_spinners_run_for_the_duration_and_stop():
    """bench/_common.spinning: N real CPU-bound processes while the block runs, none after."""
    import os
    import sys
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from _common import busy_levels, spinning

    def cpu_ticks(pid: int) -> int:  # user + system time, from /proc
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    with spinning(2) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
        start = [cpu_ticks(p.pid) for p in procs]
        time.sleep(1.0)
        spent = [cpu_ticks(p.pid) - s for p, s in zip(procs, start)]
        assert all(t >= os.sysconf("SC_CLK_TCK") // 20 for t in spent), spent  # they spin, not sleep
    assert all(p.poll() is not None for p in procs)  # killed and reaped
    assert busy_levels(1) == [0, 1] and busy_levels(0) == [0]


@pytest.mark.fast
@pytest.mark.parametrize("script", sorted(p.name for p in (Path(__file__).parents[1] / "bench").glob("*.py")))
def test_every_benchmark_script_imports(script, monkeypatch):
    # The benchmarks are not run by the tests (they take minutes), so a name moved inside
    # ec2train once broke two of them unnoticed. Importing each one resolves its imports
    # (their work runs under `if __name__ == "__main__"`).
    import importlib.util
    import sys

    bench_dir = Path(__file__).parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench_dir))
    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", bench_dir / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    runs = 'if __name__ == "__main__":' in (bench_dir / script).read_text()
    assert runs != script.startswith("_")  # a script runs only as a script; shared modules (_*.py) never


def test_bench_leaves_out_the_gpu_loader_where_torchvision_cannot_decode_on_the_device():
    from ec2train.errors import UserError
    from ec2train.perf import _decodable

    notes: list[str] = []
    assert _decodable(("cpu", "gpu"), "cuda:0", notes.append) == ("cpu",)  # no CUDA here: the probe fails
    assert notes and notes[0].startswith("gpu loader left out: torchvision cannot decode JPEGs on cuda:0")
    with pytest.raises(UserError, match="--loader gpu: torchvision cannot decode JPEGs on cuda:0"):
        _decodable(("gpu",), "cuda:0", notes.append)
    assert _decodable(("cpu", "gpu"), "cpu", notes.append) == ("cpu", "gpu")
