"""The command line itself: help at 80 columns, typo suggestions, defaults from TrainConfig,
archs layout, the torchrun relay, and the messages a new user meets first."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from ec2train.cli import app, main
from ec2train.cli._app import Amp, Compile, Device, Optim
from ec2train.config import AMP_MODES, DEVICES, FIELDS, OPTIMIZERS, ConfigError, resolve
from tests.support.cli import assert_one_line_error, cli_in_process, run_cli
from tests.support.training import TINY_FIT


def _commands(cmd, path=()):
    """Every leaf command of the CLI with its argv path: (("fit",), cmd), (("data", "demo"), cmd), ..."""
    subs = getattr(cmd, "commands", None)
    if not subs:
        yield path, cmd
        return
    for name, sub in subs.items():
        yield from _commands(sub, (*path, name))


ROOT = get_command(app)
COMMANDS = dict(_commands(ROOT))


@pytest.mark.fast
@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_help_at_80_columns_shows_every_option_name_whole(path):
    res = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    assert "…" not in res.output, res.output
    assert max(map(len, res.output.splitlines())) <= 80, res.output
    for param in COMMANDS[path].params:
        for name in (*param.opts, *param.secondary_opts):
            if name.startswith("--"):
                assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", res.output), (name, res.output)


@pytest.mark.fast
def test_a_misspelt_option_suggests_the_closest_one_only(capsys):
    code, _, err = cli_in_process(capsys, "fit", "--epoch", "3")
    assert code == 2 and "--epochs" in err, err
    assert "--spot-watch" not in err and "--warmup-epochs" not in err, err
    code, _, err = cli_in_process(capsys, "deploy", "status", "--nam", "x")
    assert code == 2 and "--name" in err, err


@pytest.mark.fast
def test_option_help_shows_the_dataclass_defaults():
    """Each fit option that is a TrainConfig field states that field's default, written once."""
    fit = COMMANDS[("fit",)]
    checked = 0
    for param in fit.params:
        field = FIELDS.get(param.name)
        default = getattr(field, "default", None)
        if field is None or default in (None, "") or param.name == "kms_key":
            continue
        if isinstance(default, bool):
            shown = "on" if default else "off"
        else:
            shown = f"{default:g}" if isinstance(default, float) else str(default)
        assert param.help.endswith(f"[default: {shown}]"), (param.name, param.help)
        assert param.default is None  # not given: --config, then the dataclass decide
        checked += 1
    assert checked >= 25


@pytest.mark.fast
def test_every_training_setting_is_a_fit_option():
    """TrainConfig is the one list of settings: fit offers each of them (momentum included)."""
    names = {param.name for param in COMMANDS[("fit",)].params}
    assert set(FIELDS) <= names, sorted(set(FIELDS) - names)
    with pytest.raises(ConfigError, match="--momentum 1.0: must be in"):
        resolve(momentum=1.0)


@pytest.mark.fast
def test_choice_options_offer_what_validate_accepts():
    for enum, allowed in ((Amp, AMP_MODES), (Device, DEVICES), (Optim, OPTIMIZERS)):
        assert tuple(e.value for e in enum) == allowed
    with pytest.raises(ConfigError, match="auto, fp16, bf16, off"):
        resolve(amp="fp8")
    # Written twice because hw (torch; shipped in the SageMaker package without config.py) cannot
    # import config, nor the CLI's --help hw: the copies agree.
    from ec2train import hw
    from ec2train.config import LOADERS

    assert hw.LOADER_MODES == LOADERS and tuple(e.value for e in Compile) == hw.COMPILE_MODES


def test_archs_prints_columns_that_fit_the_terminal():
    from ec2train.model import classification_archs

    res = run_cli("archs", env={**os.environ, "COLUMNS": "80"})
    lines = res.stdout.splitlines()
    assert res.returncode == 0 and len(lines) > 5, res.stdout
    assert max(map(len, lines)) <= 80, res.stdout
    assert sorted(res.stdout.split()) == sorted(classification_archs())


@pytest.mark.fast
def test_nproc_per_node_relays_the_arguments_main_was_given(monkeypatch, capsys):
    """main(argv) in a process whose sys.argv says something else: torchrun gets argv's fit options."""
    import ec2train.cli.train as train_cli

    calls = []

    class Agent:  # torchrun's agent, started and waited for; a clean exit
        pid = os.getpid()

        def __init__(self, cmd, **kwargs):
            calls.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(train_cli.subprocess, "Popen", Agent)
    monkeypatch.setattr(sys, "argv", ["ec2train", "archs"])
    for epochs in ("1", "2"):  # a second call must not see the first one's arguments
        with pytest.raises(SystemExit) as exc:
            main(["fit", "--nproc-per-node", "2", "--epochs", epochs, "--data", "d"])
        assert exc.value.code == 0
    first, second = calls
    assert "--nproc-per-node" not in first and first[-4:] == ["--epochs", "1", "--data", "d"], first
    assert second[-4:] == ["--epochs", "2", "--data", "d"], second


def test_fit_summary_lists_last_pt_and_predict_calls_it_a_checkpoint(capsys, demo_data, tmp_path):
    settings = {**TINY_FIT, "epochs": 1}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    out_dir = tmp_path / "out"
    code, out, err = cli_in_process(
        capsys, "fit", "--data", demo_data, "--output", out_dir, "--logdir", tmp_path / "runs", *args
    )
    assert code == 0, err
    cells = re.sub(r"[\s│]", "", out)  # the table's cells, long paths folded back together
    assert f"checkpoint{out_dir / 'last.pt'}" in cells and f"model{out_dir / 'model.pth'}" in cells, out

    image = sorted((demo_data / "test" / "001.Circle").glob("*.jpg"))[0]
    code, _, err = cli_in_process(capsys, "predict", "--model", out_dir / "last.pt", image)
    assert_one_line_error(code, err, "training checkpoint", f"--model {out_dir / 'model.pth'}")
    assert "state_dict" not in err


QUICK_EXIT = """
import atexit, sys, threading, time
from ec2train.cli import program
atexit.register(lambda: print("atexit ran", flush=True))
if sys.argv[1] == "thread":  # a thread Python waits for: the exit must wait too
    threading.Thread(target=lambda: (time.sleep(1), print("thread done", flush=True))).start()
sys.argv = ["ec2train", *sys.argv[2:]]
program()
print("not reached")
"""


@pytest.mark.parametrize("thread", ["none", "thread"])
def test_the_program_exits_quickly_yet_runs_exit_handlers_and_keeps_exit_codes(thread, tmp_path):
    ok = subprocess.run(
        [sys.executable, "-c", QUICK_EXIT, thread, "archs"], capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0, ok.stderr
    assert "resnet50" in ok.stdout and "atexit ran" in ok.stdout and "not reached" not in ok.stdout
    assert ("thread done" in ok.stdout) == (thread == "thread")
    bad = subprocess.run(
        [sys.executable, "-c", QUICK_EXIT, thread, "fit", "--data", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "atexit ran" in bad.stdout, bad.stderr


def test_output_lost_at_exit_is_not_a_success():
    """stdout on a full disk: Python's own exit says so with status 120; the quick exit too."""
    code = "import sys; from ec2train.cli import quick_exit; sys.stdout.write('x' * 10); quick_exit(0)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-c", code], stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=60
        )
    assert done.returncode == 120 and "could not write the output" in done.stderr, done.stderr


def test_console_script_entry_point_is_the_package_main():
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'ec2train = "ec2train.cli:program"' in text
    res = subprocess.run(
        [sys.executable, "-c", "from ec2train.cli import main; main(['--help'])"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and "fit" in res.stdout and "deploy" in res.stdout, res.stderr


@pytest.mark.fast
def test_heavy_imports_pause_the_collector_then_freeze_what_they_built():
    import gc

    from ec2train.cli._app import heavy_imports

    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        with heavy_imports():
            assert not gc.isenabled()
            built = [[i] for i in range(1000)]  # containers, as an import makes
        assert gc.isenabled() and gc.get_freeze_count() >= frozen + len(built)
        with pytest.raises(ImportError), heavy_imports():  # a failed import leaves the collector on
            raise ImportError("no such module")
        assert gc.isenabled()
        gc.disable()  # a caller that had it off keeps it off
        with heavy_imports():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()
