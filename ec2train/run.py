"""The one wrapper every training path goes through (`ec2train fit`, tune's trials and
--then-fit, and unattended jobs, whose runner starts `ec2train fit`): loop.fit plus what the
cloud adds.

- remote resume: a checkpoint in S3 (--resume s3://..., or --resume auto with --s3-uri on a
  fresh instance) is downloaded into --output first (checkpoint.Resume decides), so fit only
  ever reads local files;
- the S3 mirror (s3.RunSync, rank 0): the output folder and TensorBoard logs every epoch,
  flushed at exit;
- stopping cleanly: a spot interruption notice (spot.SpotWatcher) or SIGTERM (docker stop,
  systemd, instance shutdown) stops fit at the next step; the last completed epoch's
  checkpoint stays (and is in S3 before the process exits) and the process exits with
  EXIT_INTERRUPTED. `ec2train fit ... --resume auto` continues from it, on any instance,
  and ends with the same weights as an uninterrupted run. Ctrl-C stops the same way and
  then raises StoppedByCtrlC (the CLI exits 130); a second Ctrl-C ends the run at once.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ec2train import ddp, s3
from ec2train.checkpoint import CHECKPOINT_FILE, CONFIG_FILE, Resume
from ec2train.config import TrainConfig
from ec2train.errors import UserError
from ec2train.loop import FitResult, fit
from ec2train.spot import EXIT_INTERRUPTED, SpotWatcher

EXIT_CTRL_C = 130  # 128 + SIGINT, what shells report for Ctrl-C
# Where rank 0 records why it stopped, for `fit --nproc-per-node`: torchrun reports any worker's
# non-zero exit as its own exit 1, so the launcher reads the real status (75, 130) from here.
EXIT_FILE_ENV = "EC2TRAIN_EXIT_FILE"


def interrupted_exit_status(status: int = EXIT_INTERRUPTED) -> int:
    """The exit status of a stopped fit process: `status` for the one that uploads (rank 0), 0
    for the other ranks.

    torchrun SIGTERMs every worker as soon as one exits non-zero; if the other ranks exited
    75 first, rank 0 could be killed in the middle of its final upload. Exiting 0 lets torchrun
    wait for rank 0, whose 75 then becomes the run's root cause. Under `fit --nproc-per-node`
    (EXIT_FILE_ENV set) rank 0 records `status` for the launcher and exits 0 as well: torchrun
    would report any non-zero exit as its own exit 1, with a page of traceback, for a clean stop.
    """
    if not ddp.env_from().is_main:
        return 0
    recorded = os.environ.get(EXIT_FILE_ENV)
    if recorded:
        try:
            Path(recorded).write_text(str(status))
            return 0
        except OSError:
            pass  # the launcher then reports torchrun's own status
    return status


def launcher_status(torchrun_status: int, recorded: str | None) -> int:
    """The exit status of `fit --nproc-per-node`: rank 0's recorded stop status (75 for a spot
    notice or SIGTERM, 130 for Ctrl-C) when it recorded one, else torchrun's own."""
    if recorded and recorded.strip().isdigit():
        return int(recorded.strip())
    return torchrun_status


class StoppedByCtrlC(KeyboardInterrupt):
    """Ctrl-C stopped fit_run cleanly: at a step boundary, the last completed epoch's checkpoint
    kept and S3 flushed. A KeyboardInterrupt, so a Python caller ends as Ctrl-C always ends it;
    `result` is what fit returned."""

    def __init__(self, result: FitResult):
        super().__init__("stopped by Ctrl-C")
        self.result = result


class StopOnSignals:
    """While active, SIGTERM and the first Ctrl-C (SIGINT) ask fit to stop at the next step
    instead of ending the process where it stands. Then a second SIGTERM kills the process as
    usual and a second Ctrl-C raises KeyboardInterrupt at once.

    The handler only records the signal (a flag, polled after every step, cannot be lost the way
    a KeyboardInterrupt raised inside a __del__ or a broad except is); a helper thread says what
    happens (printing inside a handler can hit "reentrant call" on a half-written stdout).
    Only this process reacts: DataLoader workers forked from it inherit the handler and ignore
    both signals, although a terminal sends Ctrl-C to the whole process group and systemd
    SIGTERMs the whole cgroup (a worker that died of it would break the clean stop with
    "DataLoader worker exited unexpectedly"). Only the main thread can install handlers: in any
    other thread (a tuning worker) this does nothing.
    """

    def __init__(self, say: Callable[[str], None] = lambda msg: None) -> None:
        self.signum: int | None = None  # the first signal received
        self._say = say
        self._pid = os.getpid()
        self._seen = threading.Event()
        self._previous: dict[int, Any] = {}
        self._announcer: threading.Thread | None = None

    def received(self) -> bool:
        return self.signum is not None

    @property
    def ctrl_c(self) -> bool:
        return self.signum == signal.SIGINT

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: this process decides
        if self.signum is None:
            self.signum = signum
            self._seen.set()
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)  # die of it, as an unhandled SIGTERM does

    def _announce(self) -> None:
        self._seen.wait()
        if self.signum is not None:
            what = "Ctrl-C" if self.ctrl_c else "SIGTERM"
            again = "Ctrl-C again to quit at once" if self.ctrl_c else "a second SIGTERM kills it"
            self._say(
                f"[bold yellow]{what}[/bold yellow]: stopping at the next step; the last completed "
                f"epoch's checkpoint stays ({again})"
            )

    def __enter__(self) -> StopOnSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
            self._announcer = threading.Thread(target=self._announce, name="ec2train-stop-signal", daemon=True)
            self._announcer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._seen.set()  # ends the announcer; it prints first if a signal came
        if self._announcer is not None:
            self._announcer.join(timeout=5)


def _open_sync(cfg: TrainConfig, resume: Resume, say: Callable[[str], None]) -> s3.RunSync | None:
    if cfg.kms_key and not cfg.s3_uri:
        raise UserError("--kms-key encrypts what --s3-uri uploads; add --s3-uri s3://bucket/prefix")
    if not (cfg.s3_uri and ddp.env_from().is_main):
        return None
    sync = s3.RunSync(cfg.s3_uri, cfg.output, cfg.logdir, cfg.kms_key or None, log=say)
    try:
        resume.refuse_overwrite(sync.preflight())
    except BaseException:
        sync.uploader.close()
        raise
    return sync


def fit_run(
    cfg: TrainConfig,
    *,
    console: Any = None,
    spot_watch: str = "auto",
    spot_poll_seconds: float = 5.0,
    should_stop: Callable[[], bool] | None = None,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
) -> FitResult:
    """loop.fit with remote resume, the S3 mirror, and the spot/SIGTERM/Ctrl-C stop (see module doc).

    interrupted=True in the result: a notice, SIGTERM or should_stop stopped it (stopped_by says
    which); the last completed epoch's checkpoint is on disk (and in S3, uploaded before this
    returns). on_epoch(epoch, record): fit's hook, called after the epoch's files are queued for S3.
    Ctrl-C stops the same way, then raises StoppedByCtrlC (a KeyboardInterrupt); a second
    Ctrl-C raises KeyboardInterrupt at once.
    """
    env = ddp.env_from()
    say = console.print if (console is not None and env.is_main) else (lambda msg: None)
    resume = Resume.of(cfg)
    resume.refuse_local_overwrite()  # before anything reaches S3
    sync = _open_sync(cfg, resume, say)
    watcher = SpotWatcher(spot_watch, spot_poll_seconds, log_line=say)
    with StopOnSignals(say) as signals:
        try:
            resume = resume.fetch_remote(env, say)
            watcher.start()
            stops = [watcher.should_stop, signals.received, *([should_stop] if should_stop else [])]
            result = fit(
                cfg,
                console=console,
                should_stop=lambda: any(f() for f in stops),
                on_epoch=_in_turn(sync.on_epoch if sync else None, on_epoch),
                resume=resume,
            )
        except BaseException as exc:
            if sync is not None:
                if isinstance(exc, Exception) and not isinstance(exc, s3.S3Error):
                    sync.abort()  # a crash: still save what the last epoch left
                else:
                    sync.uploader.close(discard=True)  # S3 itself failed, or Ctrl-C twice: do not wait on uploads
            raise
        finally:
            watcher.stop()
        _finish_sync(sync, result, say, signals.ctrl_c)
    if result.interrupted:
        result.stopped_by = _stop_cause(watcher, signals.signum)
        say(_stopped_line(cfg, result, watcher, signals.signum, sync))
    if signals.ctrl_c:
        if not result.interrupted:
            say(f"Ctrl-C came after the last training step: the run had finished; its model is {result.model_path}")
        raise StoppedByCtrlC(result)
    return result


def _in_turn(*hooks: Callable[[int, dict[str, Any]], None] | None) -> Callable[[int, dict[str, Any]], None] | None:
    """One on_epoch hook that calls the given ones in order (None when none is given)."""
    given = [h for h in hooks if h is not None]
    if not given:
        return None

    def on_epoch(epoch: int, record: dict[str, Any]) -> None:
        for hook in given:
            hook(epoch, record)

    return on_epoch


def _finish_sync(sync: s3.RunSync | None, result: FitResult, say: Callable[[str], None], ctrl_c: bool) -> None:
    """The final S3 upload (a second Ctrl-C skips it)."""
    if sync is None:
        return
    if result.already_finished:
        sync.uploader.close(discard=True)  # nothing changed: nothing to upload
        return
    if ctrl_c:
        say(f"uploading the run's last files to {sync.prefix} (Ctrl-C again to skip)")
    seconds = sync.finish(result.logdir)
    say(
        f"{result.output} and the TensorBoard logs are in {sync.prefix} ({sync.uploader.uploads} uploads; {seconds:.1f} s at exit)"
    )


def _stop_cause(watcher: SpotWatcher, signum: int | None) -> str:
    """What stopped fit: a notice, a signal, or a request from elsewhere."""
    if watcher.notice:
        return f"a spot interruption notice ({watcher.notice.action} at {watcher.notice.time})"
    if signum is not None:
        return "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    return "a stop request (a spot notice or SIGTERM seen by another process, or the caller's should_stop)"


def _stopped_line(cfg: TrainConfig, result: FitResult, watcher: SpotWatcher, signum: int | None, sync) -> str:
    done = len(result.history)
    where = sync.prefix.child(CHECKPOINT_FILE) if sync else Path(cfg.output) / CHECKPOINT_FILE
    notice = watcher.notice
    took = f" in {time.monotonic() - notice.seen_at:.1f} s" if notice else ""
    what = result.stopped_by
    kept = (
        f"the checkpoint of epoch {done} is in {where}"
        if done
        else "no epoch had finished, so there is no checkpoint yet"
    )
    line = f"[bold yellow]stopped by {what}[/bold yellow]{took}: {done} of {cfg.epochs} epochs done, {kept}."
    if signum == signal.SIGINT:
        return line  # the CLI's hint follows, with its exit code
    return f"{line} Exit code {EXIT_INTERRUPTED}. Continue on any instance with the same command plus --resume auto" + (
        f" (settings: {sync.prefix.child(CONFIG_FILE)})" if sync else ""
    )


def interrupted_hint(output: str | Path) -> str:
    """What `ec2train fit` prints when Ctrl-C ended it (exit 130)."""
    if (Path(output) / CHECKPOINT_FILE).is_file():
        return "interrupted; the last completed epoch's checkpoint is intact (resume with --resume auto)"
    return (
        "interrupted before the first epoch finished: there is no checkpoint yet (run the same command to start again)"
    )
