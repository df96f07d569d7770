"""Distributed training with real torchrun processes (CPU, gloo) and the rank-aware pure helpers.

Each torchrun launch costs seconds of imports on a shared box, so each one serves several tests
through a module-scoped fixture:
- `cli_run`: `python -m ec2train fit --nproc-per-node 2` (log, equivalence, exact odd-split metrics);
- `two_nodes`: two 1-process torchrun "nodes" rendezvousing with c10d, each with its own --output,
  running tests/support/ddp_probe.py (the real fit, recording which images each rank trained on);
- the worker-kill test under --max-restarts 1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from ec2train import ddp
from ec2train.checkpoint import resume_schedule
from ec2train.cli import main
from ec2train.config import TrainConfig, resolve
from ec2train.data import EvalSampler, TrainSampler, make_demo_dataset, mix_seed
from ec2train.errors import UserError
from ec2train.evaluate import evaluate_model_file
from ec2train.loop import fit
from ec2train.model import build_model
from ec2train.optim import effective_lr, lr_lambda
from tests.support.net import free_port
from tests.support.paths import ROOT

PROBE = ROOT / "tests" / "support" / "ddp_probe.py"  # run by path, as torchrun runs a script
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# One OpenMP thread per worker so the processes do not fight over the cores; wide lines so rich
# does not wrap the paths we look for in the log.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "1000"}
TIMEOUT = 240

# Per-rank batch B=8; 64 training images divide by 2B, so every step of 2 ranks x B is the
# same set of images as one step of 1 process x 2B. Frozen backbone (BatchNorm in eval mode)
# and no augmentation make the step a function of the images alone; SGD keeps the update linear
# in the gradient, so float noise stays float noise.
COMMON = dict(
    arch="resnet18",
    weights="none",
    image_size=32,
    workers=0,
    epochs=2,
    augment=False,
    freeze_backbone=True,
    optimizer="sgd",
    lr=0.05,
)


def cli_args(**settings) -> list[str]:
    args = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else flag.replace("--", "--no-", 1))
        else:
            args += [flag, str(value)]
    return args


def run(cmd: list[str], timeout: float = TIMEOUT, **kw) -> subprocess.CompletedProcess:
    """Run to completion in its own process group, which is killed if it overruns."""
    proc = subprocess.Popen(
        cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def state_dicts_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), rtol=1e-4, atol=1e-6), key


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """4 classes x 16 train images; valid and test 4 x 3 + 1 = 13 images (odd: 7 + 6 over 2 ranks)."""
    root = make_demo_dataset(
        tmp_path_factory.mktemp("ddp") / "data", classes=4, per_class=16, size=32, eval_per_class=3
    )
    for split in ("valid", "test"):
        folder = root / split / "002.Square"
        first = sorted(folder.iterdir())[0]
        shutil.copy(first, folder / "extra.jpg")
    return root


# ---------------------------------------------------------------- pure pieces


@pytest.mark.fast
@pytest.mark.parametrize("n", [10, 11, 13])
def test_train_sampler_shards_are_disjoint_and_cover_the_split(n):
    shards = [TrainSampler(n, rank, 2, seed=3).indices() for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == -(-n // 2)  # every rank takes the same number of steps
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    padding = 2 * len(shards[0]) - n  # wrap-around repeats only this many images, only to even out
    assert len(shards[0]) + len(shards[1]) - len(set(shards[0]) | set(shards[1])) == padding
    assert len(set(shards[0])) == len(shards[0]) and len(set(shards[1])) == len(shards[1])


@pytest.mark.fast
def test_train_sampler_reshuffles_with_set_epoch_and_keys_do_not_depend_on_world_size():
    sampler = TrainSampler(64, 0, 2, seed=0)
    first = sampler.indices()
    sampler.set_epoch(1)
    assert sampler.indices() != first
    one = dict(TrainSampler(64, 0, 1, seed=0))
    two = dict(TrainSampler(64, 0, 2, seed=0)) | dict(TrainSampler(64, 1, 2, seed=0))
    assert one == two  # same per-sample augmentation seeds whatever the number of processes


@pytest.mark.fast
@pytest.mark.parametrize("n,world", [(13, 2), (5, 4), (3, 4)])
def test_eval_sampler_counts_every_image_exactly_once(n, world):
    shards = [list(EvalSampler(n, rank, world)) for rank in range(world)]
    assert sorted(sum(shards, [])) == list(range(n))
    assert [len(EvalSampler(n, rank, world)) for rank in range(world)] == [len(s) for s in shards]


@pytest.mark.fast
def test_env_and_device_from_torchrun_variables():
    env = ddp.env_from({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (3, 1, 4, 2)
    assert env.distributed and not env.is_main
    assert ddp.env_from({}) == ddp.DistEnv() and ddp.DistEnv().is_main
    assert ddp.under_torchrun({"TORCHELASTIC_RUN_ID": "x"}) and not ddp.under_torchrun({})
    assert ddp.select_device("auto", 1, 4) == "cuda:1"
    assert ddp.select_device("auto", 1, 0) == "cpu"
    assert ddp.backend_for("cuda:1") == "nccl" and ddp.backend_for("cpu") == "gloo"
    with pytest.raises(UserError, match="lower --nproc-per-node"):
        ddp.select_device("auto", 4, 4)


@pytest.mark.fast
def test_sync_bn_needs_cuda_and_only_converts_with_several_processes():
    assert ddp.use_sync_bn(False, "cpu", 2) is False
    assert ddp.use_sync_bn(True, "cuda", 8) is True
    assert ddp.use_sync_bn(True, "cuda", 1) is False  # one process: nothing to synchronise
    with pytest.raises(UserError, match="--sync-bn needs CUDA GPUs.*drop --sync-bn"):
        ddp.use_sync_bn(True, "cpu", 2)


def test_sync_bn_on_cpu_is_a_one_line_error_before_training(small_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *cli_args(data=small_data, output=tmp_path / "out", sync_bn=True, device="cpu", **COMMON)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --sync-bn needs CUDA GPUs") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.fast
def test_scale_lr_multiplies_by_world_size_and_launcher_pieces():
    cfg = TrainConfig(lr=0.01, scale_lr=True)
    assert effective_lr(cfg, 8) == pytest.approx(0.08)
    assert effective_lr(TrainConfig(lr=0.01), 8) == 0.01
    assert ddp.resolve_nproc("auto", 4) == 4 and ddp.resolve_nproc("auto", 0) == 1 and ddp.resolve_nproc("3", 0) == 3
    with pytest.raises(UserError):
        ddp.resolve_nproc("two", 0)
    args = ddp.strip_option(
        ["--data", "d", "--nproc-per-node", "2", "--nproc-per-node=2", "--epochs", "3"], "--nproc-per-node"
    )
    assert args == ["--data", "d", "--epochs", "3"]
    assert ddp.torchrun_command("py", 2, args)[:5] == [
        "py",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
    ]


@pytest.mark.fast
def test_restarted_workers_get_a_fresh_store_namespace_on_one_node():
    one_node = {"TORCHELASTIC_USE_AGENT_STORE": "True", "GROUP_WORLD_SIZE": "1", "TORCHELASTIC_RESTART_COUNT": "2"}
    assert ddp.restart_namespace(one_node) == "ec2train/attempt_2"
    assert ddp.restart_namespace({**one_node, "TORCHELASTIC_RESTART_COUNT": "0"}) != ddp.restart_namespace(one_node)
    assert (
        ddp.restart_namespace({**one_node, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    )  # torch's own store per round
    # Restart counts differ between nodes' agents, so several nodes keep torch's keys and get a warning instead.
    nodes = {**one_node, "GROUP_WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "3"}
    assert ddp.restart_namespace(nodes) is None
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in ddp.restart_warning(nodes)
    assert ddp.restart_warning({**nodes, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None
    assert ddp.restart_warning(one_node) is None


@pytest.mark.fast
def test_newest_checkpoint_wins_and_schedule_follows_this_runs_steps():
    assert ddp.holder_of_newest([-1, -1]) is None
    assert ddp.holder_of_newest([-1, 3, 3, 1]) == 1
    assert ddp.holder_of_newest([2, -1]) == 0
    # A checkpoint written at 12 steps/epoch resumed with 6 steps/epoch: lr must be where 6/epoch puts it.
    old_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    old = torch.optim.lr_scheduler.LambdaLR(old_opt, lr_lambda(12, 4, 0))
    for _ in range(12):  # one epoch of the saving run
        old_opt.step()
        old.step()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # this run's lr (e.g. --scale-lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(6, 4, 0))
    resume_schedule(sched, old.state_dict(), 6)
    assert sched.last_epoch == 6 and sched.base_lrs == [0.1]
    assert opt.param_groups[0]["lr"] == 0.1 * lr_lambda(6, 4, 0)(6)  # bit for bit what the schedule computes
    assert sched.get_last_lr() == [opt.param_groups[0]["lr"]]
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * lr_lambda(6, 4, 0)(7))


# ---------------------------------------------------------------- `ec2train fit --nproc-per-node 2`


@pytest.fixture(scope="module")
def cli_run(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    proc = run(
        [
            sys.executable,
            "-m",
            "ec2train",
            "fit",
            "--nproc-per-node",
            "2",
            *cli_args(data=small_data, output=out / "model", logdir=out / "runs", batch_size=8, **COMMON),
        ]
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    return out, proc.stdout


def test_nproc_per_node_launches_two_ranks_and_logs_the_batches(cli_run):
    out, log = cli_run
    assert "torch.distributed.run --standalone --nproc-per-node=2 -m ec2train fit" in log
    assert "world size 2, per-rank batch 8, global batch 16, lr 0.05" in log
    assert "loader workers per process, gloo process group" in log  # the CPU's backend; nccl beside GPUs
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_batch"] == 16 and metrics["epochs_run"] == 2
    # Each rank trained on half the training set each epoch: no rank saw all 64 images.
    assert [h["images_per_rank"] for h in metrics["history"]] == [[32, 32], [32, 32]]
    assert (out / "model" / "model.pth").is_file() and (out / "model" / "last.pt").is_file()
    assert any((out / "runs").rglob("events.out.tfevents.*"))


def test_two_ranks_with_batch_b_equal_one_process_with_batch_2b(cli_run, small_data, tmp_path):
    out, _ = cli_run
    single = fit(
        resolve(
            data=str(small_data), output=str(tmp_path / "one"), logdir=str(tmp_path / "runs"), batch_size=16, **COMMON
        )
    )
    assert single.metrics["world_size"] == 1
    for name in ("last.pt", "model.pth"):
        key = "model" if name == "last.pt" else "state_dict"
        two = torch.load(out / "model" / name, weights_only=True)[key]
        one = torch.load(tmp_path / "one" / name, weights_only=True)[key]
        state_dicts_close(two, one)
    # The head did train, so the two runs agree on trained weights, not on their initialisation.
    trained = torch.load(out / "model" / "last.pt", weights_only=True)["model"]["fc.weight"]
    torch.manual_seed(0)  # as fit does before building the model
    assert not torch.allclose(build_model("resnet18", 4, "none").fc.weight, trained, atol=1e-3)


def test_metrics_over_an_odd_split_are_exact(cli_run, small_data):
    out, _ = cli_run
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    valid = evaluate_model_file(out / "model" / "model.pth", small_data, "valid")
    test = evaluate_model_file(out / "model" / "model.pth", small_data, "test")
    assert valid["images"] == test["images"] == 13
    assert metrics["test_images"] == 13  # 7 + 6 over the two ranks; a padded sampler would count 14
    assert metrics["valid_acc1"] == pytest.approx(valid["acc1"], abs=1e-9)
    assert metrics["test_acc1"] == pytest.approx(test["acc1"], abs=1e-9)
    assert metrics["test_loss"] == pytest.approx(test["loss"], rel=1e-4)


# ---------------------------------------------------------------- two nodes, no shared disk


@pytest.fixture(scope="module")
def two_nodes(cli_run, small_data, tmp_path_factory):
    """Node B holds a 2-epoch checkpoint (cli_run's); node A has nothing. They rendezvous with
    c10d and train to 4 epochs, 2 ranks, each node writing only to its own folders."""
    root = tmp_path_factory.mktemp("nodes")
    settings = {**COMMON, "batch_size": 8}
    (root / "B" / "out").mkdir(parents=True)
    # cli_run finished its 2 epochs, and a finished run is never extended: B holds its checkpoint
    # as that of a 4-epoch run stopped after epoch 2 (a spot notice, say), which --resume continues.
    ckpt = torch.load(cli_run[0] / "model" / "last.pt", weights_only=True)
    ckpt["config"]["epochs"] = 4
    torch.save(ckpt, root / "B" / "out" / "last.pt")
    pre_history = json.loads((cli_run[0] / "model" / "metrics.json").read_text())["history"]

    port, run_id = free_port(), f"test-{uuid.uuid4().hex[:8]}"
    procs = {}
    try:
        for node in ("A", "B"):  # A starts first, so it has the lower pid: c10d makes it rank 0
            cmd = [
                *TORCHRUN,
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                run_id,
                str(PROBE),
                str(root / node / "seen"),
                "fit",
                *cli_args(
                    data=small_data,
                    output=root / node / "out",
                    logdir=root / node / "runs",
                    scale_lr=True,
                    **{**settings, "epochs": 4},
                ),
            ]
            procs[node] = subprocess.Popen(
                cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
            )
        logs = {node: p.communicate(timeout=TIMEOUT)[0] for node, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for node, p in procs.items():
        assert p.returncode == 0, f"node {node}:\n{logs[node][-4000:]}"
    return root, logs, pre_history


def test_two_nodes_complete_a_fit_and_only_rank_0_writes(two_nodes):
    root, logs, _ = two_nodes
    a, b = root / "A", root / "B"
    assert "world size 2, per-rank batch 8, global batch 16, lr 0.1" in logs["A"]  # --scale-lr: 0.05 x 2
    for name in ("model.pth", "metrics.json", "config.toml", "last.pt"):
        assert (a / "out" / name).is_file(), name
    assert any((a / "runs").rglob("events.out.tfevents.*"))
    # Node B wrote nothing: its folder still holds only the checkpoint placed there, and no logs.
    assert sorted(p.name for p in (b / "out").iterdir()) == ["last.pt"] and not (b / "runs").exists()
    metrics = json.loads((a / "out" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs_run"] == 4
    assert [h["images_per_rank"] for h in metrics["history"]] == [[32, 32]] * 4


def test_two_nodes_resume_from_the_newest_checkpoint_on_either_node(two_nodes):
    root, logs, pre_history = two_nodes
    # Rank 0 (node A) had no checkpoint; node B's 2-epoch last.pt was read there and broadcast.
    assert f"resuming from {root / 'B' / 'out' / 'last.pt'}: 2 of 4 epochs done" in logs["A"]
    history = json.loads((root / "A" / "out" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[:2] == pre_history


def test_two_nodes_trained_on_disjoint_shards_covering_the_split(two_nodes):
    root, _, _ = two_nodes
    seen = [json.loads((root / node / "seen" / f"rank{rank}.json").read_text()) for rank, node in enumerate("AB")]
    epochs = {}  # (epoch, rank) -> indices, the epoch recovered from each sample's seed
    for rank, keys in enumerate(seen):
        for index, seed in keys:
            epoch = next(e for e in range(4) if mix_seed(0, e, index) == seed)
            epochs.setdefault((epoch, rank), []).append(index)
    assert sorted(epochs) == [(2, 0), (2, 1), (3, 0), (3, 1)]  # epochs 0 and 1 came from the checkpoint
    for epoch in (2, 3):
        r0, r1 = epochs[(epoch, 0)], epochs[(epoch, 1)]
        assert len(r0) == len(r1) == 32 and not set(r0) & set(r1)
        assert sorted(r0 + r1) == list(range(64))
    assert epochs[(2, 0)] != epochs[(3, 0)]  # set_epoch reshuffled the shards


# ---------------------------------------------------------------- fault tolerance


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(v[5:]) for v in env if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def test_killed_worker_restarts_and_finishes_every_epoch_once(small_data, tmp_path):
    epochs = 4
    out = tmp_path / "out"
    cmd = [
        *TORCHRUN,
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        "-m",
        "ec2train",
        "fit",
        *cli_args(
            data=small_data, output=out, logdir=tmp_path / "runs", **{**COMMON, "epochs": epochs, "batch_size": 8}
        ),
    ]
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "last.pt").exists():  # the first epoch's checkpoint: epoch 2 is under way
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.02)
        victims = [pid for pid in _children(proc.pid) if _rank_of(pid) == 1]
        assert len(victims) == 1, victims
        os.kill(victims[0], signal.SIGKILL)
        assert proc.wait(timeout=TIMEOUT) == 0, log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = log_path.read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    # The restarted workers continued from a checkpoint of at least one finished epoch ...
    done = [
        int(line.split(": ", 1)[1].split(" of ")[0]) for line in log.splitlines() if line.startswith("resuming from ")
    ]
    assert len(done) == 1 and 1 <= done[0] < epochs, log[-4000:]
    # ... and every epoch ran to the end exactly once.
    assert metrics["epochs_run"] == epochs
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, epochs + 1))
    assert metrics["test_images"] == 13


@pytest.mark.fast
def test_the_launcher_exits_with_rank_0s_recorded_stop_not_torchruns_status():
    from ec2train.run import launcher_status

    # Rank 0 records its stop and exits 0 (so torchrun reports no failure); torchrun's 1 comes
    # from an older rank 0 or a crash after recording.
    assert launcher_status(0, "75") == 75 and launcher_status(0, "130\n") == 130 and launcher_status(1, "75") == 75
    assert launcher_status(1, None) == 1 and launcher_status(1, "") == 1 and launcher_status(0, None) == 0
