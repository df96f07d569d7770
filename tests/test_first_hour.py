"""What a new user meets in the first hour: install hints that install into the right Python,
suggestions that name the fix, and output that reads at 80 columns."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli import assert_one_line_error, cli_in_process

# ---------------------------------------------------------------- install hints


@pytest.mark.parametrize(
    "module,args,extra",
    [("uvicorn", ("serve", "--model", "no-such-model.pth"), "serve"), ("optuna", ("tune", "--trials", "1"), "tune")],
)
def test_a_missing_extra_names_the_python_that_runs_ec2train(capsys, monkeypatch, module, args, extra):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    code, _, err = cli_in_process(capsys, *args)
    hint = f"{shlex.quote(sys.executable)} -m pip install 'ec2train[{extra}]'"
    assert_one_line_error(code, err, hint)


def test_the_install_hint_is_a_command_pip_runs():
    """The hint, run as printed (a dry run, offline): this Python's pip resolves it."""
    from ec2train.errors import pip_install

    hint = pip_install("ec2train[serve,tune]")
    assert hint.startswith(shlex.quote(sys.executable) + " -m pip install ")
    res = subprocess.run(
        [*shlex.split(hint), "--dry-run", "--no-index", "--quiet"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------- the README's path and the docs' snippets

ROOT = Path(__file__).resolve().parent.parent


def _blocks(markdown: str, after: str, lang: str = "") -> list[str]:
    """The fenced code blocks (of `lang`) in `markdown` between `after` and the next heading."""
    section = markdown.split(after, 1)[1].split("\n#", 1)[0]
    return [b.split("\n", 1)[1] for b in section.split("```")[1::2] if b.split("\n", 1)[0].strip() == lang]


def test_make_demo_installs_the_extras_the_readme_tries_next():
    """The quickstart's `Then try` block runs serve and tune: `make demo`'s install has their extras."""
    readme = (ROOT / "README.md").read_text()
    tried = " ".join(_blocks(readme, "Then try:"))
    needed = {extra for extra in ("serve", "tune") if f"ec2train {extra} " in tried}
    assert needed == {"serve", "tune"}
    makefile = (ROOT / "Makefile").read_text()
    assert "\ndemo: install\n" in makefile
    recipe = makefile.split("$(VENV)/.installed:", 1)[1].split("\n\n", 1)[0]
    (spec,) = [line.split("-e", 1)[1].strip(" '") for line in recipe.splitlines() if "pip install" in line]
    assert set(spec.removeprefix(".[").removesuffix("]").split(",")) >= needed


def test_default_outputs_are_ignored_by_git():
    """fit's TrainedModels/ and runs/, tune's tune/STUDY/ and the demo data: `git status` stays clean."""
    from ec2train.config import TrainConfig

    outputs = [TrainConfig.output, TrainConfig.logdir, "tune/ec2train", "demo-data"]
    files = [f"{folder}/some-file" for folder in outputs]
    res = subprocess.run(["git", "check-ignore", *files], cwd=ROOT, capture_output=True, text=True)
    assert sorted(res.stdout.split()) == sorted(files)
    # ... but not the tune package's own files
    assert subprocess.run(["git", "check-ignore", "ec2train/tune/new.py"], cwd=ROOT).returncode == 1


@pytest.fixture(scope="module")
def served(trained_model: Path):
    """`ec2train serve` on a free loopback port, as a user starts it."""
    import time
    import urllib.request

    from tests.support.net import free_port

    port = free_port()
    args = ["serve", "--model", str(trained_model), "--port", str(port), "--compile", "off", "--log-level", "warning"]
    proc = subprocess.Popen([sys.executable, "-m", "ec2train", *args], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).status == 200:
                break
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.2)
    yield port
    proc.terminate()
    proc.wait(30)


def test_the_python_snippets_in_docs_serve_work_as_written_without_aws_keys(served, demo_data, tmp_path):
    snippets = _blocks((ROOT / "docs" / "serve.md").read_text(), "Try it:", "python")
    assert len(snippets) == 2  # plain HTTP, and boto3
    image = next((demo_data / "test").rglob("*.jpg"))
    (tmp_path / "dog.jpg").write_bytes(image.read_bytes())
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    env["AWS_EC2_METADATA_DISABLED"] = "true"  # a laptop: no keys anywhere, no instance role
    for code in snippets:
        code = code.replace("127.0.0.1:8080", f"127.0.0.1:{served}")
        res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert "'predictions'" in res.stdout and res.stdout.count("'label'") == 3, res.stdout
