"""ec2train tune: real Optuna studies over the real `fit` on tiny generated data.

Pruning, failed trials, resume, parallel worker processes, best.toml round trip, bad input.
squeezenet1_0 at 32 px: the quickest torchvision model here that learns the demo shapes
within two epochs (lr 1e-3: valid acc 0.44 then 0.61; lr 1e-7: stays at chance, 0.33).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import optuna
import pytest

from ec2train.config import resolve, to_toml
from ec2train.tune import (
    Param,
    TuneError,
    counted_trials,
    load_space,
    parse_duration,
    plan_workers,
    tune,
    visible_gpus,
    worker_count,
)
from tests.support.cli import assert_one_line_error, cli_in_process

TS = optuna.trial.TrialState
FIXED = dict(arch="squeezenet1_0", weights="none", image_size=32, workers=0, augment=False)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One intra-op thread per process: on a shared 2-core box, more threads only spin."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the parallel test's trial processes
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from ec2train.data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("tune") / "d", classes=3, per_class=16, size=32, eval_per_class=6)


def _trials(db: Path, study: str):
    return optuna.load_study(study_name=study, storage=f"sqlite:///{db}").get_trials(deepcopy=False)


def _hparams_sessions(folder: Path) -> tuple[list[dict], list[str]]:
    """The hparams (session start infos) and session end statuses written directly in `folder`."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    sessions, ends = [], []
    for f in folder.glob("events.out.tfevents.*"):
        for ev in EventFileLoader(str(f)).Load():
            for v in ev.summary.value:
                data = plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
                if v.tag == "_hparams_/session_start_info":
                    hparams = data.session_start_info.hparams
                    sessions.append({k: x.string_value or x.number_value for k, x in hparams.items()})
                elif v.tag == "_hparams_/session_end_info":
                    ends.append(api_pb2.Status.Name(data.session_end_info.status))
    return sessions, ends


def _scalar_tags(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return {
        v.tag
        for f in folder.rglob("events.out.tfevents.*")
        for ev in EventFileLoader(str(f)).Load()
        for v in ev.summary.value
        if v.HasField("simple_value") or v.metadata.plugin_data.plugin_name == "scalars"
    }


def _writer_threads() -> int:
    return sum(type(t).__name__ == "_AsyncWriterThread" and t.is_alive() for t in threading.enumerate())


# ---------------------------------------------------------------- pure parts


@pytest.mark.fast
def test_each_worker_gets_its_gpu():
    assert visible_gpus(None, 4) == ["0", "1", "2", "3"]
    assert visible_gpus("2,3", 2) == ["2", "3"]  # the box's ids, as the parent sees them
    assert visible_gpus("", 0) == []
    assert worker_count(None, ["0", "1", "2", "3"], "auto") == 4
    assert worker_count(None, ["0", "1"], "cpu") == 1
    assert worker_count(None, [], "auto") == 1
    assert worker_count(3, [], "auto") == 3
    assert plan_workers(4, ["0", "1", "2", "3"], "auto") == ["0", "1", "2", "3"]
    assert plan_workers(4, ["2", "3"], "cuda") == ["2", "3", "2", "3"]  # two trials per GPU
    assert plan_workers(2, [], "auto") == [None, None]  # CPU: inherit the environment
    assert plan_workers(2, ["0"], "cpu") == [None, None]
    with pytest.raises(TuneError, match="at least 1"):
        worker_count(0, [], "auto")


@pytest.mark.fast
def test_durations():
    assert parse_duration("90s") == 90
    assert parse_duration("30m") == 1800
    assert parse_duration("2h") == 7200
    assert parse_duration("1h30m") == 5400
    assert parse_duration("600") == 600
    for bad in ("2 hours", "h", "-5m", "1.5.2h", "", "0s"):
        with pytest.raises(TuneError, match="--timeout"):
            parse_duration(bad)


@pytest.mark.fast
def test_trials_stopped_by_ctrl_c_do_not_count():
    study = optuna.create_study(direction="maximize")
    make = optuna.trial.create_trial
    study.add_trial(make(state=TS.COMPLETE, value=0.5))
    study.add_trial(make(state=TS.PRUNED))
    study.add_trial(make(state=TS.FAIL, user_attrs={"error": "ValueError: boom"}))  # a real failure counts
    study.add_trial(make(state=TS.FAIL, user_attrs={"interrupted": True}))
    study.enqueue_trial({"lr": 1e-3})  # waiting: run by the next trial started, not an extra one
    assert counted_trials(study) == 3


@pytest.mark.fast
def test_space_file_overrides_defaults_and_rejects_bad_ranges(tmp_path):
    base = resolve(**FIXED, epochs=3)
    f = tmp_path / "space.toml"
    f.write_text(
        "[lr]\nlow = 1e-4\nhigh = 1e-1\nlog = true\n[batch_size]\nchoices = [8, 16]\n[optimizer]\nchoices = ['adamw', 'sgd']\n"
    )
    space = {p.name: p for p in load_space(f, base)}
    assert space["lr"] == Param("lr", 1e-4, 1e-1, log=True)
    assert space["batch_size"].choices == (8, 16)
    assert space["optimizer"].choices == ("adamw", "sgd")
    assert space["label_smoothing"].low == 0.0  # untouched defaults stay
    from ec2train.config import FIELDS
    from ec2train.tune import SEARCHABLE

    assert set(SEARCHABLE) <= set(FIELDS)  # every searchable name is a fit setting
    bad = {
        "[lrate]\nlow = 1e-4\nhigh = 1e-2\n": "unknown parameter 'lrate'; did you mean 'lr'",
        "[lr]\nlow = 0.1\nhigh = 0.001\n": "low 0.1 must be below high 0.001",
        "[lr]\nlow = 0\nhigh = 0.1\nlog = true\n": "log = true needs low > 0",
        "[lr]\nlow = 1e-3\nhigh = 2.0\n": "far too large",  # fit's own validation
        "[label_smoothing]\nlow = 0.0\nhigh = 1.0\n": "must be in [0, 1)",
        "[batch_size]\nchoices = []\n": "non-empty list",
        "[batch_size]\nlow = 8.5\nhigh = 64\n": "whole number",
        "[optimizer]\nlow = 1\nhigh = 2\n": "takes choices",
        "[optimizer]\nchoices = ['adam']\n": "must be one of adamw, sgd",
        "[lr]\nlow = 1e-4\nhi = 1e-2\n": "unknown key 'hi'",
        "lr = 0.1\n": "must be a table",
        "[lr\n": "not valid TOML",
    }
    for text, needle in bad.items():
        f.write_text(text)
        with pytest.raises(TuneError) as exc:
            load_space(f, base)
        assert needle in str(exc.value) and "\n" not in str(exc.value), (text, str(exc.value))


def test_bad_space_and_timeout_are_one_line_cli_errors(tmp_path, tiny_data, capsys):
    space = tmp_path / "space.toml"
    space.write_text("[lr]\nlow = 0.1\nhigh = 0.001\n")
    common = ["tune", "--data", tiny_data, "--output", tmp_path / "o", "--arch", "squeezenet1_0", "--weights", "none"]
    code, _, err = cli_in_process(capsys, *common, "--space", space)
    assert_one_line_error(code, err, "space.toml [lr]", "low 0.1 must be below high 0.001")
    code, _, err = cli_in_process(capsys, *common, "--timeout", "2 hours")
    assert_one_line_error(code, err, "--timeout", "90s, 30m, 2h")
    code, _, err = cli_in_process(capsys, *common, "--storage", "tune.db")
    assert_one_line_error(code, err, "--storage", "sqlite:///tune.db")
    assert not (tmp_path / "o" / "trial-0").exists()


@pytest.mark.parametrize(
    "url,shown,secrets",
    [
        ("sqlite:///tune.db", "sqlite:///tune.db", []),
        ("postgresql://user:pa@ss@host/db", "postgresql://user:***@host/db", ["pa@ss", "ss@"]),  # the last @ ends it
        ("postgresql://user:p/w?x#y@host:5432/db", "postgresql://user:***@host:5432/db", ["p/w?x#y"]),
        (
            "postgresql://user:secret@host/db?password=qs&sslmode=require&sslpassword=k",
            "postgresql://user:***@host/db?password=***&sslmode=require&sslpassword=***",
            ["secret", "qs", "=k"],
        ),
        ("mysql://u@h/d?passwd=z;application_name=a", "mysql://u@h/d?passwd=***;application_name=a", ["=z"]),
        (
            "postgresql://h/d?PASSWORD=a1&pass%77ord=b1&api_key=c1&access_token=d1",
            "postgresql://h/d?PASSWORD=***&pass%77ord=***&api_key=***&access_token=***",
            ["a1", "b1", "c1", "d1"],
        ),
        ("postgresql://:tok@host/db", "postgresql://:***@host/db", ["tok"]),
        ("postgresql://NAME@host/db", "postgresql://NAME@host/db", []),  # a user name alone is not secret
        ("user:secret@host", "user:***@host", ["secret"]),  # not a URL at all
        (
            "postgresql://h/db?options=a@b&password=c1",
            "postgresql://h/db?options=a@b&password=***",
            ["c1"],
        ),  # an @ in the query
        ("sqlite:////tmp/a.db?password=hunter2", "sqlite:////tmp/a.db?password=***", ["hunter2"]),
    ],
)
def test_storage_urls_are_shown_without_credentials(url, shown, secrets):
    from ec2train.tune.study import shown_url

    masked = shown_url(url)
    assert masked == shown
    for secret in secrets:
        assert secret not in masked.replace("***", ""), (url, masked)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://user:pa@ss@127.0.0.1:1/db?password=qsecret",  # no driver installed: cannot open
        "postgresql://user:pa@ss@host:notaport/db?password=qsecret",  # SQLAlchemy cannot parse it
        "user:pa@ss@host?password=qsecret",  # no scheme
    ],
)
def test_storage_errors_never_print_the_password(tmp_path, tiny_data, capsys, url):
    common = ["tune", "--data", tiny_data, "--output", tmp_path / "o", "--arch", "squeezenet1_0", "--weights", "none"]
    code, out, err = cli_in_process(capsys, *common, "--storage", url)
    assert_one_line_error(code, err, "--storage")
    for secret in ("pa@ss", "ss@", "qsecret"):
        assert secret not in out + err, err


def test_a_study_in_a_database_with_a_password_is_announced_without_it(tmp_path, tiny_data, capsys):
    url = f"sqlite:///{tmp_path / 'study.db'}?password=hunter2"
    study = optuna.create_study(study_name="ec2train", storage=url, direction="maximize")
    lr = optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)
    study.add_trial(optuna.trial.create_trial(params={"lr": 1e-3}, distributions={"lr": lr}, value=0.5))
    common = ["tune", "--data", tiny_data, "--output", tmp_path / "o", "--arch", "squeezenet1_0", "--weights", "none"]
    code, out, err = cli_in_process(capsys, *common, "--storage", url, "--trials", "1")  # done already: none runs
    assert code == 0, err
    assert "study 'ec2train' in sqlite:///" in out and "password=***" in out, out
    assert "hunter2" not in out + err


# ---------------------------------------------------------------- real studies


@pytest.mark.filterwarnings("ignore:Fixed parameter label_smoothing with value 1.5 is out of range")
def test_pruning_failures_and_best_settings(tmp_path, tiny_data):
    """Enqueued trials make it deterministic: a good lr completes, a broken setting fails without
    stopping the study, and lr 1e-7 (no learning) is pruned against the good trial's accuracy."""
    out, db = tmp_path / "tune", tmp_path / "tune" / "study.db"
    out.mkdir()
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{db}", direction="maximize")
    # 1e-3: every layer of a scratch squeezenet trains at --lr (no backbone scale), and 3e-3 stalls it.
    good = {"lr": 1e-3, "batch_size": 16, "weight_decay": 1e-4, "label_smoothing": 0.0}
    study.enqueue_trial(good)
    study.enqueue_trial({**good, "label_smoothing": 1.5})  # fit rejects it: the trial fails
    study.enqueue_trial({**good, "lr": 1e-7})
    threads_before = _writer_threads()
    base = resolve(
        data=str(tiny_data), epochs=3, logdir=str(tmp_path / "runs"), output=str(tmp_path / "final"), **FIXED
    )

    space = load_space(None, base)[1:] + [Param("lr", 1e-8, 1e-2, log=True)]
    # Judged from epoch 2 on (one warm-up epoch), against the one complete trial.
    result = tune(
        base, trials=3, study_name="s", space=space, output=out, prune_startup_trials=1, prune_warmup_epochs=1
    )

    trials = _trials(db, "s")
    assert [t.state for t in trials] == [TS.COMPLETE, TS.FAIL, TS.PRUNED], [(t.state, t.user_attrs) for t in trials]
    assert "--label-smoothing 1.5: must be in [0, 1)" in trials[1].user_attrs["error"]
    pruned = trials[2]
    assert pruned.params["lr"] == pytest.approx(1e-7)
    assert list(pruned.intermediate_values) == [1, 2]  # stopped after epoch 2 of 3
    assert list(trials[0].intermediate_values) == [1, 2, 3]
    assert max(pruned.intermediate_values.values()) < max(trials[0].intermediate_values.values())
    # A pruned trial's fit stopped from its on_epoch hook and still closed its TensorBoard writer.
    assert _writer_threads() == threads_before
    # Each trial ran in its own folder and TensorBoard run, through the ordinary fit.
    assert (out / "trial-0" / "model.pth").is_file() and (out / "trial-0" / "metrics.json").is_file()
    assert (out / "trial-2" / "model.pth").is_file() and not (out / "trial-2" / "metrics.json").exists()
    assert not list(out.glob("trial-*/last.pt"))  # trials never resume: no checkpoints left to fill the disk
    tb = tmp_path / "runs" / "tune-s"
    # Each trial's fit run is in the HParams tab from its first epoch on, the pruned one too; the
    # complete one is a success there. No hparam/* charts among the curves.
    (run0,), (run2,) = (list((tb / f"trial-{n}").glob("squeezenet1_0-*")) for n in (0, 2))
    sessions0, ends0 = _hparams_sessions(run0)
    sessions2, ends2 = _hparams_sessions(run2)
    assert len(sessions0) == len(sessions2) == 1 and (ends0, ends2) == (["STATUS_SUCCESS"], [])
    assert sessions2[0]["lr"] == pytest.approx(1e-7) and sessions0[0]["lr"] == pytest.approx(good["lr"])
    assert "epoch/accuracy" in _scalar_tags(run2 / "validation")
    assert not [t for t in _scalar_tags(tb) if t.startswith("hparam")]
    assert not (tb / "trial-1").exists()  # failed before training
    # best.toml: the fixed settings plus the winning parameters; fit reads it.
    assert result.best_number == 0 and result.best_file == out / "best.toml"
    best = resolve(result.best_file)
    assert best == resolve(
        data=str(tiny_data), epochs=3, logdir=str(tmp_path / "runs"), output=str(tmp_path / "final"), **FIXED, **good
    )
    assert [r["state"] for r in result.rows] == ["COMPLETE", "FAIL", "PRUNED"]
    assert not list(out.glob(".*.tmp"))


def test_diverged_trial_fails_and_study_goes_on(tmp_path, tiny_data, monkeypatch):
    """A NaN training loss is a failed trial (not a low score), and the next trial still runs."""
    import ec2train.run

    real_fit = ec2train.run.fit  # what run.fit_run, and so every trial, calls
    calls = []

    def fit_that_diverges_first(cfg, **kw):
        calls.append(cfg.lr)
        if len(calls) == 1:
            kw["on_epoch"](0, {"epoch": 1, "train_loss": float("nan"), "valid_acc1": 0.0})
        return real_fit(cfg, **kw)

    monkeypatch.setattr(ec2train.run, "fit", fit_that_diverges_first)
    space = [Param("lr", choices=(3e-3,))]
    base = resolve(data=str(tiny_data), epochs=1, logdir=str(tmp_path / "runs"), **FIXED)
    result = tune(base, trials=2, study_name="nan", space=space, output=tmp_path / "t")
    states = [r["state"] for r in result.rows]
    assert states == ["FAIL", "COMPLETE"], result.rows
    assert "train loss is nan at epoch 1" in result.rows[0]["error"]
    assert result.best_number == 1


@pytest.mark.fast
def test_the_fit_line_after_a_study_works_as_printed_when_its_output_holds_a_run(tmp_path):
    # best.toml keeps the study's fit --output (TrainedModels): after `make demo` that folder
    # holds a run, and the printed `fit --config best.toml` was refused (fit never replaces one).
    from ec2train.tune.study import fit_command

    out = tmp_path / "TrainedModels"
    best = tmp_path / "best.toml"
    best.write_text(to_toml(resolve(output=str(out), **FIXED)))
    assert fit_command(best) == f"ec2train fit --config {best}"
    out.mkdir()
    (out / "model.pth").write_bytes(b"a run")
    assert fit_command(best) == f"ec2train fit --config {best} --output {tmp_path / 'TrainedModels-tuned'}"
    (tmp_path / "TrainedModels-tuned").mkdir()
    (tmp_path / "TrainedModels-tuned" / "last.pt").write_bytes(b"another")
    assert fit_command(best).endswith(f"--output {tmp_path / 'TrainedModels-tuned-2'}")


def test_resume_continues_the_count_then_fit_and_fit_config(tmp_path, tiny_data, capsys):
    base_toml = tmp_path / "base.toml"
    base_toml.write_text(to_toml(resolve(output=str(tmp_path / "final"), logdir=str(tmp_path / "runs"), **FIXED)))
    out = tmp_path / "t"
    args = ["tune", "--config", base_toml, "--data", tiny_data, "--epochs", 1, "--study", "r", "--output", out]

    code, stdout, err = cli_in_process(capsys, *args, "--trials", 2)
    assert code == 0, err
    assert len(_trials(out / "study.db", "r")) == 2
    assert "study r: 2 trials" in stdout and f"ec2train fit --config {out / 'best.toml'}" in stdout

    code, stdout, err = cli_in_process(capsys, *args, "--trials", 4, "--timeout", "1h", "--then-fit")
    assert code == 0, err
    assert "2 trials so far, running 2 more" in stdout
    trials = _trials(out / "study.db", "r")
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state in (TS.COMPLETE, TS.PRUNED, TS.FAIL) for t in trials)
    best = max((t for t in trials if t.state == TS.COMPLETE), key=lambda t: (t.value, -t.number))
    # --then-fit trained the final model where the base config says, with the best parameters.
    final = resolve(tmp_path / "final" / "config.toml")
    assert (tmp_path / "final" / "model.pth").is_file()
    for name, value in best.params.items():
        assert getattr(final, name) == pytest.approx(value), name

    # `ec2train fit --config best.toml` accepts the file and trains with the best parameters.
    code, _, err = cli_in_process(capsys, "fit", "--config", out / "best.toml", "--output", tmp_path / "again")
    assert code == 0, err
    again = resolve(tmp_path / "again" / "config.toml")
    assert {n: getattr(again, n) for n in best.params} == pytest.approx(best.params)
    assert again.epochs == 1 and again.arch == "squeezenet1_0"

    # The same command once more: nothing left to run, and it says how to run more.
    code, stdout, err = cli_in_process(capsys, *args, "--trials", 4)
    assert code == 0, err
    assert "4 trials so far, none to run: --trials counts the study's trials in all, so --trials 8 runs 4 more" in (
        " ".join(stdout.split())
    )
    assert len(_trials(out / "study.db", "r")) == 4

    # Continuing the study with a different fixed setting would mix incomparable trials.
    code, _, err = cli_in_process(capsys, *args, "--trials", 5, "--image-size", 48)
    assert_one_line_error(code, err, "study 'r' was run with image_size=32", "use another --study")
    assert len(_trials(out / "study.db", "r")) == 4


def test_parallel_workers_share_the_study(tmp_path, tiny_data, capsys):
    """--parallel 2 on the CPU: two trial processes at once, one study in one sqlite file."""
    code, stdout, err = cli_in_process(
        capsys,
        "tune",
        "--data",
        tiny_data,
        "--trials",
        2,
        "--epochs",
        1,
        "--parallel",
        2,
        "--study",
        "p",
        "--output",
        tmp_path / "t",
        "--logdir",
        tmp_path / "runs",
        "--arch",
        "squeezenet1_0",
        "--weights",
        "none",
        "--image-size",
        32,
        "--workers",
        0,
        "--no-prune",
    )
    assert code == 0, err
    assert "2 at a time" in stdout
    trials = _trials(tmp_path / "t" / "study.db", "p")
    assert [t.state for t in trials] == [TS.COMPLETE, TS.COMPLETE], [t.user_attrs for t in trials]
    assert {t.user_attrs["worker"].strip() for t in trials} == {"[worker 0]", "[worker 1]"}
    pids = {t.user_attrs["pid"] for t in trials}
    assert len(pids) == 2 and os.getpid() not in pids
    # Both ran at the same time.
    a, b = sorted(trials, key=lambda t: t.datetime_start)
    assert b.datetime_start < a.datetime_complete
    assert a.params != b.params  # differently seeded samplers
    assert (tmp_path / "t" / "best.toml").is_file() and not list((tmp_path / "t").glob(".tune-job-*"))


def test_trials_mirror_to_s3_a_spot_notice_stops_the_study_and_the_same_command_continues(
    aws, imds, tmp_path, tiny_data, capsys, monkeypatch
):
    """tune goes through fit's cloud wrapper: with s3_uri from --config each trial mirrors its
    folder to PREFIX/trial-N/ and --then-fit's model goes to PREFIX/; a spot notice stops the
    running trial (not counted) and the study, exit 75, and the same command continues it."""
    from ec2train import aws as aws_mod
    from tests.support.cli import run_cli

    bucket = "ec2train-tune"
    s3 = aws_mod.client("s3")
    s3.create_bucket(Bucket=bucket)
    final = tmp_path / "final"
    base_toml = tmp_path / "base.toml"
    base = resolve(
        data=str(tiny_data),
        epochs=2,
        output=str(final),
        logdir=str(tmp_path / "runs"),
        s3_uri=f"s3://{bucket}/s",
        **FIXED,
    )
    base_toml.write_text(to_toml(base))
    out = tmp_path / "t"
    args = ["tune", "--config", base_toml, "--trials", 3, "--study", "spot", "--output", out, "--no-prune"]

    # The notice comes once trial 0 is done: trial 1's watcher sees it at its first poll.
    server = imds(notice_when=lambda: (out / "trial-0" / "metrics.json").exists())
    env = {k: v for k, v in os.environ.items() if k != "AWS_EC2_METADATA_DISABLED"}
    env.update(AWS_ENDPOINT_URL=aws, AWS_EC2_METADATA_SERVICE_ENDPOINT=server.url, OMP_NUM_THREADS="1")
    proc = run_cli(*args, env=env)
    text = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 75, text
    assert "spot interruption notice" in text and "run the same command" in text and "Traceback" not in text, text
    assert server.notices_sent >= 1 and server.tokenless_gets == 0
    trials = _trials(out / "study.db", "spot")
    assert [t.state for t in trials] == [TS.COMPLETE, TS.FAIL], [t.user_attrs for t in trials]
    assert trials[1].user_attrs["interrupted"] and not trials[0].user_attrs.get("interrupted")
    # Trial 0's folder is in S3, byte for byte; trial 1 was stopped before its first epoch ended.
    for name in ("model.pth", "metrics.json", "config.toml"):
        body = s3.get_object(Bucket=bucket, Key=f"s/trial-0/{name}")["Body"].read()
        assert body == (out / "trial-0" / name).read_bytes(), name
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert not {k for k in keys if k.startswith("s/trial-1/") and k.endswith((".pth", ".pt"))}, keys
    assert any(k.startswith("s/trial-0/runs/") for k in keys)  # its TensorBoard curves

    # A fresh start of the same command (no notice now) runs the two trials still to go, then the final fit.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    code, stdout, err = cli_in_process(capsys, *args, "--then-fit")
    assert code == 0, err
    assert "1 trials so far, running 2 more" in " ".join(stdout.split())
    assert [t.state for t in _trials(out / "study.db", "spot")] == [TS.COMPLETE, TS.FAIL, TS.COMPLETE, TS.COMPLETE]
    for n in (2, 3):
        assert s3.get_object(Bucket=bucket, Key=f"s/trial-{n}/metrics.json")["Body"].read()
    for name in ("model.pth", "last.pt", "metrics.json"):
        assert s3.get_object(Bucket=bucket, Key=f"s/{name}")["Body"].read() == (final / name).read_bytes(), name


def test_sigterm_to_a_parallel_study_stops_its_trials_at_a_step_and_starts_no_more(tmp_path, tiny_data):
    """SIGTERM as systemd sends it at shutdown (to every process of the group): each trial process
    stops at its next step and records its trial as interrupted (not counted), the dispatcher
    starts no new one, and tune exits 75 naming SIGTERM."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "t"
    args = ["tune", "--data", tiny_data, "--trials", 4, "--epochs", 3, "--parallel", 2, "--study", "term"]
    args += ["--output", out, "--logdir", tmp_path / "runs", "--no-prune", "--arch", "squeezenet1_0"]
    args += ["--weights", "none", "--image-size", 32, "--workers", 0]
    cmd = [sys.executable, "-m", "ec2train", *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(list(out.glob("trial-*/model.pth"))) < 2:  # both trials are past their first epoch
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=240)[0]
    finally:
        proc.kill()
    text = " ".join(output.split())
    assert proc.returncode == 75, text
    assert "stopped by SIGTERM" in text and "run the same command" in text and "Traceback" not in text, text
    trials = _trials(out / "study.db", "term")
    assert len(trials) == 2, [(t.state, t.user_attrs) for t in trials]  # no third trial started
    for t in trials:
        assert t.user_attrs.get("interrupted") or t.state == TS.COMPLETE, (t.state, t.user_attrs)
    assert any(t.user_attrs.get("interrupted") for t in trials)
