"""The atomic writer: files get the umask's mode, and a full disk is one line with no temp file left."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

import pytest
import torch

from ec2train.errors import UserError
from ec2train.files import atomic_torch_save, atomic_write, atomic_write_json, atomic_write_text


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.fast
@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, mask, mode):
    with umask(mask):
        files = [
            atomic_write_text(tmp_path / "a.txt", "x"),
            atomic_write_json(tmp_path / "metrics.json", {"a": 1}),
            atomic_torch_save({"w": torch.zeros(3)}, tmp_path / "model.pth"),
        ]
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what any other program would create
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == mode == stat.S_IMODE(plain.stat().st_mode), f


def test_torch_save_on_a_real_full_disk_is_one_line(tiny_disk):
    old = atomic_write_text(tiny_disk / "model.pth", "previous model")
    with pytest.raises(UserError) as exc:
        atomic_torch_save({"w": torch.zeros(1_000_000)}, tiny_disk / "model.pth")  # 4 MB into 1 MiB
    msg = str(exc.value)
    assert "disk full" in msg and str(tiny_disk) in msg and "MiB free" in msg and "\n" not in msg
    assert "unexpected pos" not in msg
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["model.pth"], "temp file left behind"
    assert old.read_text() == "previous model"  # all or nothing


def _fill_then_fail(exc: BaseException):
    def write(p: Path) -> None:
        p.write_bytes(b"x" * 1000)
        raise exc

    return write


@pytest.mark.fast
@pytest.mark.parametrize(
    "exc", [OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EDQUOT, "Disk quota exceeded")]
)
def test_full_disk_from_any_writer_is_one_line(tmp_path, exc):
    with pytest.raises(UserError, match=rf"disk full: cannot write model.pth in {tmp_path} \(.* MiB free\)"):
        atomic_write(tmp_path / "model.pth", _fill_then_fail(exc))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.fast
def test_torch_style_failure_is_disk_full_only_when_the_disk_is(tmp_path, monkeypatch):
    import shutil

    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    with pytest.raises(RuntimeError, match="unexpected pos"):  # plenty of space: not ours to rename
        atomic_write(tmp_path / "model.pth", _fill_then_fail(torch_error))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 20, 10 << 20, 4096))
    with pytest.raises(UserError, match="disk full"):
        atomic_write(tmp_path / "model.pth", _fill_then_fail(torch_error))
    assert list(tmp_path.iterdir()) == []


def test_background_writer_keeps_order_and_reports_a_full_disk_at_wait(tmp_path, tiny_disk):
    from ec2train.files import BackgroundWriter

    saver = BackgroundWriter()
    order = []
    saver.submit(lambda: order.append("model.pth"))
    saver.submit(atomic_torch_save, {"w": torch.zeros(3)}, tmp_path / "last.pt")
    saver.submit(lambda: order.append("after"))
    saver.wait()
    assert order == ["model.pth", "after"] and torch.load(tmp_path / "last.pt", weights_only=True)["w"].shape == (3,)
    saver.submit(atomic_torch_save, {"w": torch.zeros(1_000_000)}, tiny_disk / "model.pth")  # 4 MB into 1 MiB
    with pytest.raises(UserError, match="disk full"):
        saver.wait()
    assert not (tiny_disk / "model.pth").exists()
    saver.submit(atomic_torch_save, {"w": torch.zeros(1_000_000)}, tiny_disk / "again.pth")
    saver.close()  # in `finally`: waits, and leaves the error to wait() so it cannot hide another
    assert not (tiny_disk / "again.pth").exists()


@pytest.mark.fast
def test_checkpoint_payload_is_a_snapshot_that_training_does_not_change():
    from ec2train.checkpoint import Trainables, TrainState, checkpoint_payload

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = TrainState(run_name="r", epoch=1, history=[{"epoch": 1}])
    payload = checkpoint_payload(state, Trainables(net, opt, sched), config={"lr": 0.1})
    weight, moment = payload["model"]["weight"].clone(), payload["optimizer"]["state"][0]["exp_avg"].clone()
    for _ in range(3):  # the next epoch trains while the payload is being written
        net(torch.ones(1, 3)).sum().backward()
        opt.step()
    state.history.append({"epoch": 2})
    assert torch.equal(payload["model"]["weight"], weight) and not torch.equal(net.weight.detach(), weight)
    assert torch.equal(payload["optimizer"]["state"][0]["exp_avg"], moment)
    assert payload["history"] == [{"epoch": 1}]


@pytest.mark.parametrize("background", [True, False])
def test_saves_are_whole_files_in_order_in_either_mode_and_a_full_disk_is_one_line(background, tmp_path, tiny_disk):
    """background=False (training on the CPU) pickles into the temp file in the caller's thread
    and leaves the fsync and rename to the background thread: the file is the same, the errors
    too."""
    import threading

    from ec2train.files import BackgroundWriter

    saver, out = BackgroundWriter(background), tmp_path / "out"
    pickled_in = []
    real_save = torch.save

    def spy(obj, f, *a, **k):
        pickled_in.append(threading.current_thread() is threading.main_thread())
        return real_save(obj, f, *a, **k)

    torch.save, saved = spy, {"w": torch.arange(10.0)}
    try:
        saver.save(saved, out / "last.pt")
        saver.save({"w": torch.zeros(2)}, out / "last.pt")  # the later one wins
        saver.wait()
    finally:
        torch.save = real_save
    assert pickled_in == [not background] * 2
    assert torch.equal(torch.load(out / "last.pt", weights_only=True)["w"], torch.zeros(2))
    assert [p.name for p in out.iterdir()] == ["last.pt"]  # no temp file left
    with pytest.raises(UserError, match="disk full"):  # raised by save (on the CPU) or by wait
        saver.save({"w": torch.zeros(1_000_000)}, tiny_disk / "model.pth")  # 4 MB into 1 MiB
        saver.wait()
    assert list(tiny_disk.iterdir()) == []  # neither the file nor its temp file
    saver.close()


@pytest.mark.fast
def test_a_checkpoint_stores_weights_the_best_epoch_shares_once(tmp_path):
    """A frozen backbone is the same in the best and the last epoch: last.pt holds it once,
    and a loaded checkpoint restores both exactly."""
    from ec2train.checkpoint import Trainables, TrainState, checkpoint_payload
    from ec2train.files import atomic_torch_save

    net = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 2))  # [0]: "backbone", [1]: head
    net[0].weight.requires_grad_(False)
    net[0].bias.requires_grad_(False)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    state = TrainState(run_name="r")
    state.record(1, 0.9, net)  # epoch 1 is the best
    net(torch.ones(1, 256)).sum().backward()
    opt.step()
    state.record(2, 0.5, net)  # epoch 2 is not: the head differs, the backbone does not
    best_head = state.best_model["1.weight"].clone()
    payload = checkpoint_payload(state, Trainables(net, opt, sched))
    alone = {**payload, "best_model": {k: v.clone() for k, v in payload["best_model"].items()}}
    atomic_torch_save(payload, tmp_path / "shared.pt")
    atomic_torch_save(alone, tmp_path / "alone.pt")
    backbone_bytes = 256 * 256 * 4
    assert (tmp_path / "alone.pt").stat().st_size - (tmp_path / "shared.pt").stat().st_size >= backbone_bytes
    loaded = torch.load(tmp_path / "shared.pt", weights_only=True)
    assert torch.equal(loaded["best_model"]["0.weight"], net[0].weight) and torch.equal(
        loaded["best_model"]["1.weight"], best_head
    )
    assert not torch.equal(loaded["model"]["1.weight"], best_head)


@pytest.mark.fast
def test_the_snapshot_copies_what_training_changes_and_takes_frozen_weights_as_they_are():
    from ec2train.checkpoint import Trainables, TrainState, checkpoint_payload

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    for p in net[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    payload = checkpoint_payload(TrainState(run_name="r"), Trainables(net, opt, sched))["model"]
    assert payload["0.weight"].data_ptr() == net[0].weight.data_ptr()  # frozen: no copy
    for key in ("2.weight", "1.weight", "1.running_mean"):  # trained, or changed by a forward pass in train mode
        assert payload[key].data_ptr() != net.state_dict()[key].data_ptr(), key

    # Pickled before the next step (fit on the CPU): the live tensors, nothing copied.
    net(torch.randn(3, 4)).sum().backward()
    opt.step()
    live = checkpoint_payload(TrainState(run_name="r"), Trainables(net, opt, sched), copies=False)
    for key, tensor in net.state_dict().items():
        assert live["model"][key].data_ptr() == tensor.data_ptr(), key
    momentum = opt.state_dict()["state"][0]["momentum_buffer"]
    assert live["optimizer"]["state"][0]["momentum_buffer"].data_ptr() == momentum.data_ptr()
    copied = checkpoint_payload(TrainState(run_name="r"), Trainables(net, opt, sched))
    assert copied["optimizer"]["state"][0]["momentum_buffer"].data_ptr() != momentum.data_ptr()


@pytest.mark.fast
def test_a_resumed_optimizer_keeps_this_machines_update_kernel():
    """optimizer.load_state_dict brings back the saving run's fused/foreach flags: a checkpoint
    from a foreach run (or a torch without fused CPU kernels) resumes with this run's choice."""
    from ec2train.checkpoint import Trainables, TrainState, checkpoint_payload, restore

    def parts(kernel):
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(net.parameters(), lr=0.1, **{kernel: True})
        return Trainables(net, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0))

    old = parts("foreach")
    old.net(torch.ones(1, 3)).sum().backward()
    old.optimizer.step()
    ckpt = checkpoint_payload(TrainState(run_name="r", epoch=1, history=[{"epoch": 1}]), old)
    new = parts("fused")
    restore(ckpt, new, steps_per_epoch=1)
    assert [(g["fused"], g["foreach"]) for g in new.optimizer.param_groups] == [(True, None)]
    new.net(torch.ones(1, 3)).sum().backward()
    new.optimizer.step()  # the fused kernel, with the restored moments
    assert torch.equal(new.optimizer.state_dict()["state"][0]["step"], torch.tensor(2.0))
