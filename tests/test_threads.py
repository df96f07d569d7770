"""The thread plan (thread_plans.thread_plan): its decisions as a pure function, and real processes
(fit, serve --workers, the SageMaker handler, the CLI commands) that apply it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ec2train import hw
from ec2train import threads as thread_plans
from tests.support.cli import cli_in_process
from tests.support.net import free_port
from tests.support.training import TINY_FIT


@pytest.mark.fast
@pytest.mark.parametrize(
    "cpus, procs, workers, decode, override, share, intra",
    [
        (2, 1, 1, 0, 0, 2, 1),  # fit on a 2-core box: its loader worker keeps one core
        (2, 1, 0, 0, 0, 2, 2),  # no loader workers: torch may use both
        (2, 1, 0, 1, 0, 2, 1),  # serve: one core decodes the next requests during a forward pass
        (16, 1, 8, 0, 0, 16, 8),  # a g5.4xlarge-sized box, 8 loader workers
        (16, 4, 3, 0, 0, 4, 1),  # 4 ranks x (3 workers + 1 for torch)
        (16, 4, 0, 1, 0, 4, 3),  # serve --workers 4
        (2, 4, 0, 1, 0, 1, 1),  # more processes than cores: never 0 threads
        (2, 8, 7, 1, 0, 1, 1),  # workers beyond the share: still at least one thread
        (2, 1, 1, 0, 6, 2, 6),  # --threads 6 wins, even above the cores
    ],
)
def test_plan_gives_torch_only_the_cores_left(cpus, procs, workers, decode, override, share, intra):
    plan = thread_plans.thread_plan(cpus, procs, workers, decode, override)
    assert (plan.share, plan.intra_op, plan.inter_op) == (share, intra, 1)
    assert plan.source == ("--threads" if override else "auto")


@pytest.mark.fast
def test_a_launchers_omp_num_threads_caps_the_share():
    # torchrun's OMP_NUM_THREADS=1, or tune's cores per trial: the process's share, then less its workers.
    assert thread_plans.thread_plan(16, 1, 3, launcher_share=4).intra_op == 1
    assert thread_plans.thread_plan(16, 1, 0, launcher_share=4).intra_op == 4
    # A global OMP_NUM_THREADS larger than a worker's share does not undo the split between processes.
    assert thread_plans.thread_plan(8, 4, 0, 1, launcher_share=8).intra_op == 1
    assert thread_plans.launcher_share_from_env({"OMP_NUM_THREADS": "3"}) == 3
    assert thread_plans.launcher_share_from_env({"OMP_NUM_THREADS": "junk"}) is None
    assert thread_plans.launcher_share_from_env({}) is None


@pytest.mark.fast
@pytest.mark.parametrize(
    "cpus, procs, override, launcher, lanes, intra",
    [
        (2, 1, 0, None, 2, 1),  # this box: two one-thread passes at once (plus the decode thread)
        (1, 1, 0, None, 1, 1),  # one core: one pass at a time
        (2, 2, 0, None, 1, 1),  # serve --workers 2 on two cores: each worker's share is one core
        (16, 1, 0, None, 2, 7),  # (16 - 1 decode thread) split between two lanes
        (16, 4, 0, None, 2, 1),  # serve --workers 4: 4 cores each
        (16, 1, 0, 3, 2, 1),  # OMP_NUM_THREADS=3 caps the share
        (16, 1, 5, None, 2, 5),  # --threads 5: five in each lane
    ],
)
def test_serve_plan_runs_two_lanes_where_there_are_two_cores(cpus, procs, override, launcher, lanes, intra):
    plan = thread_plans.serve_thread_plan(cpus, procs, override, launcher)
    assert (plan.lanes, plan.intra_op, plan.decode_threads) == (lanes, intra, 1)
    assert plan.intra_op * plan.lanes <= max(plan.share, override * plan.lanes)  # never more than its share
    assert thread_plans.serve_lanes(1) == 1 and thread_plans.serve_lanes(2) == thread_plans.serve_lanes(64) == 2
    described = plan.describe()
    assert ("in each of 2 forward lanes" in described) == (lanes == 2), described


@pytest.mark.fast
def test_inference_uses_channels_last_on_cpu_and_gpu_training_on_gpu_and_a_frozen_backbone_on_cpu():
    assert hw.inference_channels_last("cpu") and hw.inference_channels_last("cuda")
    assert not hw.inference_channels_last("mps")
    assert hw.use_channels_last(True, "cuda") and not hw.use_channels_last(True, "cpu")
    assert hw.use_channels_last(True, "cpu", frozen=True)  # the backbone only runs forward: inference
    assert not hw.use_channels_last(False, "cuda") and not hw.use_channels_last(False, "cpu", frozen=True)
    assert not hw.use_channels_last(True, "mps", frozen=True)


def test_a_frozen_cpu_fit_trains_its_backbone_in_channels_last(demo_data, tmp_path):
    """The decision reaches the model and the batches, and the head still learns."""
    from ec2train.config import resolve
    from ec2train.loop import make_data, make_runtime, set_train_mode, train_one_epoch, trainer_for

    cfg = resolve(
        data=str(demo_data), arch="resnet18", weights="none", freeze_backbone=True, image_size=32, epochs=3, workers=0
    )
    rt = make_runtime(cfg.device, cfg.amp, cfg.workers, threads=1)
    data = make_data(cfg, rt)
    tr = trainer_for(cfg, rt, data)
    conv = tr.net.conv1.weight
    assert tr.ctx.channels_last and conv.is_contiguous(memory_format=torch.channels_last)
    losses = []
    for epoch in range(3):
        data.train_sampler.set_epoch(epoch)
        set_train_mode(tr.model, tr.head, cfg.frozen)
        meter, _ = train_one_epoch(tr.model, data.train_loader, tr.optimizer, tr.scheduler, tr.ctx)
        losses.append(meter.summary()["loss"])
    assert losses[-1] < losses[0], losses


@pytest.mark.fast
def test_tuning_compares_the_plan_with_one_other_count_on_cpu_training_only():
    plan = lambda cpus, workers, override=0: thread_plans.thread_plan(cpus, 1, workers, override=override)  # noqa: E731
    assert thread_plans.tuning_candidates(plan(2, 1), "cpu", 1) == (1, 2)  # a light loader may leave its core idle
    assert thread_plans.tuning_candidates(plan(2, 0), "cpu", 1) == (2, 1)  # another program may hold a core
    assert thread_plans.tuning_candidates(plan(16, 8), "cpu", 1) == (8, 16)
    assert thread_plans.tuning_candidates(plan(1, 0), "cpu", 1) == (1,)  # one core: nothing to compare
    assert thread_plans.tuning_candidates(plan(2, 1, override=1), "cpu", 1) == (1,)  # --threads is obeyed
    assert thread_plans.tuning_candidates(plan(2, 1), "cuda", 1) == (1,)
    assert thread_plans.tuning_candidates(plan(2, 1), "cpu", 2) == (1,)  # DDP: a step waits for the slowest rank


@pytest.mark.fast
def test_tuner_alternates_then_keeps_the_faster_count():
    tuner = thread_plans.ThreadTuner((1, 2))
    ran = []
    for _ in range(10):
        n = tuner.threads()
        ran.append(n)
        picked = tuner.observe(n, {1: 0.9, 2: 0.8}[n])
        if picked:
            assert (picked, len(ran)) == (2, 6)  # 12% apart: decided once each count had 3 steps
    assert ran == [1, 2, 1, 2, 1, 2, 2, 2, 2, 2] and not tuner.probing
    assert tuner.describe() == "1 thread 0.90 s/step, 2 threads 0.80 s/step"
    assert tuner.observe(1, 0.01) is None and tuner.threads() == 2  # settled: no more probing


@pytest.mark.fast
@pytest.mark.parametrize("fast", [1, 2])
def test_tuner_stops_after_two_rounds_when_one_count_is_clearly_faster(fast):
    # Every step of one count at least 20% faster than every step of the other: the third
    # round (one more step at the slow count) is skipped, whichever count is the fast one.
    tuner = thread_plans.ThreadTuner((1, 2))
    times = {fast: iter([0.60, 0.65]), 3 - fast: iter([1.00, 0.95])}
    picks = []
    for _ in range(4):
        n = tuner.threads()
        picks.append(tuner.observe(n, next(times[n])))
    assert picks[:3] == [None, None, None] and not tuner.probing and tuner.threads() == fast
    assert picks[3] == (2 if fast == 2 else None)  # a change from the plan's count (1) is reported
    # Overlapping steps (one slow spike) keep the probe going to its third round.
    mixed = thread_plans.ThreadTuner((1, 2))
    for n, seconds in [(1, 1.0), (2, 0.6), (1, 1.0), (2, 0.9)]:
        assert mixed.observe(n, seconds) is None
    assert mixed.probing and mixed.threads() == 1


@pytest.mark.fast
def test_tuner_keeps_the_plan_unless_another_count_is_clearly_faster():
    tuner = thread_plans.ThreadTuner((1, 2))
    for _ in range(6):
        n = tuner.threads()
        tuner.observe(n, {1: 1.00, 2: 0.97}[n])  # 3% faster: noise, not a reason to add a thread
    assert tuner.chosen == 1 and not tuner.probing
    # A first epoch too short to finish the probe: what it measured decides at the epoch's end.
    short = thread_plans.ThreadTuner((2, 1))
    short.observe(2, 1.0)
    short.observe(1, 0.5)
    assert short.settle() == 1 and short.threads() == 1
    # Nothing measured for one count: the plan stays. A resumed run's recorded count wins.
    assert thread_plans.ThreadTuner((2, 1)).settle() is None
    assert thread_plans.ThreadTuner((2, 1)).settle(1) == 1


def _tuner_favouring(threads: int):
    """A ThreadTuner fed made-up step times in which `threads` is twice as fast."""

    class Favouring(thread_plans.ThreadTuner):
        def observe(self, n, seconds):
            return super().observe(n, 1.0 if n == threads else 2.0)

    return Favouring


def test_fit_applies_the_tuned_count_and_a_resumed_run_keeps_it(monkeypatch, tmp_path, capsys):
    """Real in-process fits with the timings made up (the seam is the tuner's input): the
    first run picks 1 thread; the resumed run, whose own probe would pick 2, keeps 1 and ends
    bitwise equal to the uninterrupted run."""
    from rich.console import Console

    from ec2train.config import resolve
    from ec2train.data import make_demo_dataset
    from ec2train.loop import fit

    monkeypatch.setattr(thread_plans, "available_cpus", lambda: 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    before = torch.get_num_threads()
    data = make_demo_dataset(tmp_path / "d", classes=2, per_class=16, size=32, eval_per_class=2)
    settings = {**TINY_FIT, "arch": "shufflenet_v2_x0_5", "epochs": 2, "batch_size": 4, "data": str(data)}
    run = lambda name, **kw: resolve(**settings, output=str(tmp_path / name), logdir=str(tmp_path / "runs"), **kw)  # noqa: E731
    live: list[int] = []
    try:
        monkeypatch.setattr(thread_plans, "ThreadTuner", _tuner_favouring(1))
        full = fit(run("full"), console=Console(width=200), on_epoch=lambda e, r: live.append(torch.get_num_threads()))
        assert [h["threads"] for h in full.history] == [1, 1] and live == [1, 1]
        assert (
            "threads: torch 1 intra-op from here on (1 thread 1.00 s/step, 2 threads 2.00 s/step)"
            in capsys.readouterr().out
        )

        steps = {"n": 0}
        stop_in_epoch_two = lambda: (steps.__setitem__("n", steps["n"] + 1), steps["n"] == 8 + 3)[1]  # noqa: E731
        assert fit(run("cut"), should_stop=stop_in_epoch_two).interrupted
        monkeypatch.setattr(thread_plans, "ThreadTuner", _tuner_favouring(2))
        resumed = fit(run("cut", resume="auto"), on_epoch=lambda e, r: live.append(torch.get_num_threads()))
        assert [h["threads"] for h in resumed.history] == [1, 1] and live[2:] == [1]
        a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
        b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)
    finally:
        torch.set_num_threads(before)


@pytest.mark.fast
def test_launchers_give_each_process_its_share_from_the_plan():
    # `fit --nproc-per-node N` and tune's parallel trials give each process plan.share as OMP_NUM_THREADS.
    assert thread_plans.process_share(4, cpus=16) == thread_plans.thread_plan(16, 4).share == 4
    assert thread_plans.process_share(4, cpus=2) == 1
    assert thread_plans.process_share(2) == thread_plans.thread_plan(thread_plans.available_cpus(), 2).share
    env = thread_plans.launch_env(2, {"PATH": "/bin"})
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": str(thread_plans.process_share(2))}
    assert thread_plans.launch_env(2, {"OMP_NUM_THREADS": "7"})["OMP_NUM_THREADS"] == "7"  # the user's stays


@pytest.mark.fast
@pytest.mark.parametrize(
    "text, cpus",
    [("max 100000\n", None), ("150000 100000\n", 1.5), ("200000 100000", 2.0), ("50000", 0.5), ("garbage", None)],
)
def test_cgroup_v2_quota(text, cpus):
    assert thread_plans.parse_cgroup_quota(cpu_max=text) == cpus


@pytest.mark.fast
def test_cgroup_v1_quota_and_the_cpu_count_it_caps(tmp_path, monkeypatch):
    assert thread_plans.parse_cgroup_quota(quota_us="-1", period_us="100000") is None
    assert thread_plans.parse_cgroup_quota(quota_us="300000", period_us="100000") == 3.0
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # docker --cpus 0.5
    assert thread_plans.cgroup_cpu_quota(str(tmp_path)) == 0.5
    monkeypatch.setattr(thread_plans, "cgroup_cpu_quota", lambda: 0.5)
    assert thread_plans.available_cpus() == 1  # rounded up, never 0
    monkeypatch.setattr(thread_plans, "cgroup_cpu_quota", lambda: None)
    assert thread_plans.available_cpus() == len(os.sched_getaffinity(0))


@pytest.mark.fast
def test_describe_names_the_numbers_and_the_reasons():
    text = thread_plans.thread_plan(4, 1, 2, 0).describe()
    assert (
        text == "threads: torch 2 intra-op, 1 inter-op (4 of 4 CPUs for this process (1 on the box), 2 loader workers)"
    )
    assert "set by --threads" in thread_plans.thread_plan(4, 1, 2, 0, override=3).describe()


def test_negative_threads_is_a_one_line_error(capsys, tmp_path):
    with pytest.raises(hw.HardwareError, match="--threads -1"):
        thread_plans.thread_plan(2, override=-1)
    code, _, err = cli_in_process(capsys, "fit", "--data", tmp_path, "--threads", "-1", "--epochs", "1")
    assert code == 2 and "Traceback" not in err and "--threads" in err


def _env_without_omp(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(extra)
    return env


def _run_fit(data: Path, out: Path, env: dict[str, str], **settings) -> str:
    """A real `ec2train fit` process; an on_epoch hook prints what torch really runs with."""
    cfg = {
        **TINY_FIT,
        "epochs": 1,
        "batch_size": 4,
        "data": str(data),
        "output": str(out / "m"),
        "logdir": str(out / "r"),
    }
    code = textwrap.dedent(f"""
        import torch
        from rich.console import Console
        from ec2train.config import resolve
        from ec2train.loop import fit
        cfg = resolve(**{cfg!r}, **{settings!r})
        fit(cfg, console=Console(width=300), on_epoch=lambda e, r: print("LIVE", torch.get_num_threads(), flush=True))
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from ec2train.data import make_demo_dataset

    return make_demo_dataset(
        tmp_path_factory.mktemp("threads") / "d", classes=2, per_class=4, size=32, eval_per_class=1
    )


@pytest.fixture(scope="module")
def model_file(tiny_data, tmp_path_factory) -> Path:
    """An untrained resnet18 model file for tiny_data's classes: thread counts do not need a trained one."""
    from ec2train.data import class_name, require_dataset
    from ec2train.export import model_payload, save_model_file
    from ec2train.model import build_model

    folders = require_dataset(tiny_data)
    payload = model_payload(
        build_model("resnet18", len(folders)).state_dict(),
        arch="resnet18",
        class_names=[class_name(f) for f in folders],
        class_folders=folders,
        image_size=32,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )
    return save_model_file(tmp_path_factory.mktemp("model") / "model.pth", payload)


def test_fit_process_applies_and_prints_the_plan(tiny_data, tmp_path):
    cpus = thread_plans.available_cpus()
    out = _run_fit(tiny_data, tmp_path / "auto", _env_without_omp())  # TINY_FIT: no loader workers
    assert f"threads: torch {cpus} intra-op" in out and f"LIVE {cpus}" in out, out
    # --threads overrides the plan, and a launcher's OMP_NUM_THREADS (torchrun's share) does not limit it.
    out = _run_fit(tiny_data, tmp_path / "flag", _env_without_omp(OMP_NUM_THREADS="1"), threads=3)
    assert "threads: torch 3 intra-op, 1 inter-op (set by --threads)" in out and "LIVE 3" in out, out


def test_each_serve_worker_applies_its_share(model_file):
    """serve --workers 2 on this box: each process's share is cpus // 2, less one decode thread."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ec2train",
            "serve",
            "--model",
            str(model_file),
            "--port",
            str(port),
            "--workers",
            "2",
            "--log-level",
            "info",
            "--compile",
            "off",
        ],
        env=_env_without_omp(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    expected = thread_plans.thread_plan(thread_plans.available_cpus(), 2, 0, 1).intra_op
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while len(lines) < 2 and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            if "threads: torch" in line:
                lines.append(line)
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=30)[0]
    assert len(lines) == 2, rest
    for line in lines:
        assert f"threads: torch {expected} intra-op" in line and f"torch.get_num_threads() = {expected}" in line, line
        assert "(2 on the box)" in line and "1 decode thread" in line, line
    assert "Traceback" not in rest, rest


def test_sagemaker_handler_splits_cores_between_model_server_workers(model_file, tmp_path):
    """The container knows its worker count: SAGEMAKER_MODEL_SERVER_WORKERS (unset: one per CPU)."""
    from ec2train._serve import inference

    cpus = thread_plans.available_cpus()
    assert inference.container_thread_plan({"SAGEMAKER_MODEL_SERVER_WORKERS": "1"}).intra_op == cpus
    assert inference.container_thread_plan({"SAGEMAKER_MODEL_SERVER_WORKERS": str(cpus)}).intra_op == 1
    assert inference.container_thread_plan({}).intra_op == 1
    # model_fn applies it, in a fresh process as each model-server worker is.
    code = (
        "import torch, sys; from ec2train._serve.inference import model_fn; "
        "model_fn(sys.argv[1]); print('LIVE', torch.get_num_threads())"
    )
    env = _env_without_omp(SAGEMAKER_MODEL_SERVER_WORKERS="1")
    out = subprocess.run(
        [sys.executable, "-c", code, str(model_file.parent)], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and f"LIVE {cpus}" in out.stdout, out.stdout + out.stderr


def test_predict_and_evaluate_apply_the_flag(capsys, model_file, tiny_data, tmp_path):
    before = torch.get_num_threads()
    try:
        image = next((tiny_data / "test").rglob("*.jpg"))
        code, out, _ = cli_in_process(capsys, "predict", image, "--model", model_file, "--threads", "1", "--json")
        assert code == 0 and torch.get_num_threads() == 1, out
        code, _, err = cli_in_process(
            capsys, "evaluate", "--model", model_file, "--data", tiny_data, "--out", tmp_path, "--threads", "3"
        )
        assert code == 0 and torch.get_num_threads() == 3 and "threads: torch 3" in " ".join(err.split()), err
    finally:
        torch.set_num_threads(before)


@pytest.mark.fast
def test_config_refuses_negative_threads():
    from ec2train.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="--threads -2"):
        TrainConfig(threads=-2)
