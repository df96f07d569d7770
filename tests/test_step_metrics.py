"""The step loop's bookkeeping: every step is counted exactly, yet no step waits for the one
before it to finish (its numbers are read once the next step is queued), and evaluate's sums
stay on the device until the end. Stop questions between ranks go over a CPU group."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ec2train import ddp, hw
from ec2train.loop import StepContext, evaluate, topk_hits, train_one_epoch
from tests.support.net import free_port

CPU = StepContext("cpu", hw.amp_policy("off", "cpu", None), False)


def _batches(sizes: list[int], classes: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=g), torch.randint(0, classes, (n,), generator=g)) for n in sizes]


def _frozen_setup(classes: int = 6):
    """A linear classifier whose optimizer does not move it (lr 0): each step's numbers can be
    computed on their own and compared."""
    torch.manual_seed(0)
    net = nn.Linear(5, classes)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    return net, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0)


def _expected(net: nn.Module, batch) -> tuple[int, float, float, float]:
    x, y = batch
    with torch.no_grad():
        logits = net(x)
    top5 = logits.topk(5, dim=1).indices
    return (
        len(y),
        F.cross_entropy(logits, y).item(),
        (logits.argmax(1) == y).sum().item() / len(y),
        top5.eq(y.unsqueeze(1)).any(1).float().sum().item(),
    )


@pytest.mark.fast
def test_every_step_is_counted_and_reported_in_order_one_step_behind():
    net, opt, sched = _frozen_setup()
    data = _batches([4, 3, 5])
    events: list[str] = []

    def loader():
        for i, batch in enumerate(data):
            events.append(f"batch {i}")
            yield batch

    reports: list[tuple[int, float, float]] = []

    def on_step(n: int, loss: float, acc: float) -> None:
        events.append(f"report {len(reports)}")
        reports.append((n, loss, acc))

    meter, stopped = train_one_epoch(
        net, loader(), opt, sched, CPU, on_step=on_step, after_step=lambda: events.append("step")
    )

    assert not stopped
    # A step's numbers are read after the next batch is in hand (its step queued), never at once;
    # after_step (the thread probe's clock) marks each step as it ends, once per step.
    assert events == [
        "batch 0", "step", "batch 1", "report 0", "step", "batch 2", "report 1", "step", "report 2"
    ]  # fmt: skip
    expected = [_expected(net, b) for b in data]
    assert [r[0] for r in reports] == [4, 3, 5]
    for (_n, loss, acc), (_, want_loss, want_acc, _) in zip(reports, expected, strict=True):
        assert abs(loss - want_loss) < 1e-5 and abs(acc - want_acc) < 1e-9
    assert meter.count == 12
    assert abs(meter.loss - sum(n * loss for n, loss, _, _ in expected)) < 1e-4
    assert meter.correct1 == sum(round(n * acc) for n, _, acc, _ in expected)
    assert meter.correct5 == sum(c5 for *_, c5 in expected)


@pytest.mark.fast
def test_a_stop_request_counts_the_step_it_came_after():
    net, opt, sched = _frozen_setup()
    seen: list[int] = []
    ended: list[int] = []
    meter, stopped = train_one_epoch(
        net,
        _batches([4, 4, 4, 4]),
        opt,
        sched,
        CPU,
        on_step=lambda n, _loss, _acc: seen.append(n),
        should_stop=lambda: len(seen) >= 1,  # true once step 1 is reported, i.e. after step 2
        after_step=lambda: ended.append(len(ended)),
    )
    assert stopped and meter.count == 8 and seen == [4, 4]
    assert ended == [0, 1]  # two steps ran: two timings, none for the late report


@pytest.mark.fast
def test_evaluate_sums_and_confusion_match_a_direct_count():
    net, _, _ = _frozen_setup(classes=6)
    data = _batches([7, 5, 9], seed=3)
    summary, confusion = evaluate(net, data, CPU, 6)
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    with torch.no_grad():
        logits = net(x)
    assert summary["images"] == 21
    assert abs(summary["loss"] - F.cross_entropy(logits, y).item()) < 1e-5
    assert summary["acc1"] == (logits.argmax(1) == y).sum().item() / 21
    assert summary["acc5"] == topk_hits(logits, y)[1].item() / 21
    assert confusion.dtype == torch.float64 and confusion.sum().item() == 21
    want = torch.zeros(6, 6, dtype=torch.float64)
    for t, p in zip(y.tolist(), logits.argmax(1).tolist(), strict=True):
        want[t, p] += 1
    assert torch.equal(confusion, want)


@pytest.mark.fast
def test_topk_hits_with_fewer_classes_than_k():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    hits = topk_hits(logits, torch.tensor([1, 2, 0]))
    assert hits.tolist() == [1.0, 3.0]  # top-5 of 3 classes holds every target


@pytest.mark.fast
def test_stop_questions_go_over_a_cpu_group_beside_nccl():
    assert ddp.control_backend("nccl") == "gloo"
    assert ddp.control_backend("gloo") is None  # the training group is on the CPU already
    # Across nodes gloo uses the interface the user chose for NCCL, unless told otherwise.
    here = lambda: ["lo", "ens5", "docker0"]  # noqa: E731
    assert ddp.gloo_ifname({"NCCL_SOCKET_IFNAME": "ens5"}, interfaces=here) == "ens5"
    assert ddp.gloo_ifname({"NCCL_SOCKET_IFNAME": "=eth0"}, interfaces=here) == "eth0"  # exact, as NCCL reads '='
    # NCCL reads a plain name as a prefix (`ens` is ens5 here); gloo needs the exact name.
    assert ddp.gloo_ifname({"NCCL_SOCKET_IFNAME": "ens"}, interfaces=here) == "ens5"
    assert ddp.gloo_ifname({"NCCL_SOCKET_IFNAME": "eth,ens"}, interfaces=here) == "ens5"
    assert ddp.gloo_ifname({"NCCL_SOCKET_IFNAME": "eth"}, interfaces=here) is None  # matches nothing here
    assert ddp.gloo_ifname({"NCCL_SOCKET_IFNAME": "^docker0,lo"}) is None  # an exclusion list, one node
    assert ddp.gloo_ifname({"NCCL_SOCKET_IFNAME": "ens5", "GLOO_SOCKET_IFNAME": "eth1"}, interfaces=here) is None
    assert ddp.gloo_ifname({}) is None
    # Across nodes with an exclusion list (or none): the interface that routes to the rendezvous host.
    nodes = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.5"}
    seen: list[str] = []
    route = lambda host: seen.append(host) or "ens5"  # noqa: E731
    assert ddp.gloo_ifname({**nodes, "NCCL_SOCKET_IFNAME": "^lo,docker"}, route) == "ens5" and seen == ["10.0.0.5"]
    assert ddp.gloo_ifname(nodes, route) == "ens5"
    assert ddp.gloo_ifname({**nodes, "LOCAL_WORLD_SIZE": "4"}, route) is None  # one node: gloo finds its peers
    # The real route: to a loopback rendezvous host, through the interface holding 127.0.0.1.
    from ec2train.netif import interface_of

    assert ddp.gloo_ifname({**nodes, "MASTER_ADDR": "127.0.0.1"}) == interface_of("127.0.0.1")


def _ask_on_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    ddp.control_backend = lambda backend: "gloo"  # what setup does beside NCCL, here beside gloo
    ddp.setup(ddp.env_from(), "cpu")
    try:
        made = ddp._control is not None
        answers = [ddp.any_rank(rank == 1), ddp.any_rank(False), ddp.any_rank(True)]
    finally:
        ddp.cleanup()
    Path(out, f"{rank}.txt").write_text(repr([made, *answers, ddp._control is None]))


def test_setup_makes_the_control_group_every_rank_asks_over_and_cleanup_drops_it(tmp_path: Path):
    import torch.multiprocessing as mp

    mp.start_processes(_ask_on_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    assert [(tmp_path / f"{r}.txt").read_text() for r in (0, 1)] == ["[True, True, False, True, True]"] * 2
