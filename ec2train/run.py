"""A training run on a cloud box: loop.fit wrapped with what the cloud adds.

- remote resume: a checkpoint in S3 (--resume s3://..., or --resume auto with --s3-uri on a
  fresh instance) is downloaded into --output first, so fit only ever reads local files;
- the S3 mirror (s3.RunSync, rank 0): the output folder and TensorBoard logs every epoch,
  flushed at exit;
- stopping cleanly: a spot interruption notice (spot.SpotWatcher) or SIGTERM (docker stop,
  systemd, instance shutdown) stops fit at the next step; the last completed epoch's
  checkpoint stays (and is in S3 before the process exits) and the process exits with
  EXIT_INTERRUPTED. `ec2train fit ... --resume auto` continues from it, on any instance,
  and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ec2train import ddp, s3
from ec2train.checkpoint import CHECKPOINT_FILE, CONFIG_FILE, resume_mode
from ec2train.config import TrainConfig
from ec2train.errors import UserError
from ec2train.loop import FitResult, fit
from ec2train.spot import SpotWatcher

# Exit status of `ec2train fit` stopped by a spot notice or SIGTERM: EX_TEMPFAIL from
# sysexits.h, "try again later", which is exactly what --resume auto does. Not 143 (killed by
# SIGTERM): the run did not die, it stopped at a step boundary and kept its checkpoint, and a
# supervisor can tell this from a kill (systemd: RestartForceExitStatus=75).
EXIT_INTERRUPTED = 75


def interrupted_exit_status() -> int:
    """EXIT_INTERRUPTED for the process that uploads (rank 0), 0 for the other ranks.

    torchrun SIGTERMs every worker as soon as one exits non-zero; if the other ranks exited
    75 first, rank 0 could be killed in the middle of its final upload. Exiting 0 lets torchrun
    wait for rank 0, whose 75 then becomes the run's root cause.
    """
    return EXIT_INTERRUPTED if ddp.env_from().is_main else 0


class StopOnSigterm:
    """While active, SIGTERM asks fit to stop at the next step instead of killing the process;
    a second SIGTERM kills it as usual. Only the main thread can install signal handlers: in
    any other thread (a tuning worker) this does nothing."""

    def __init__(self) -> None:
        self.received = threading.Event()
        self._previous: Any = None

    def _handle(self, signum, frame) -> None:
        self.received.set()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the next one ends the process at once

    def __enter__(self) -> "StopOnSigterm":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def fetch_remote_checkpoint(cfg: TrainConfig, say: Callable[[str], None]) -> TrainConfig:
    """Download the S3 checkpoint this run resumes from (with its model.pth) into --output.

    Done by the processes that read a checkpoint (rank 0, and each node's local rank 0 in auto
    mode, see checkpoint.agreed_checkpoint); returns cfg with --resume pointing at the local copy.
    """
    env, torchrun = ddp.env_from(), ddp.under_torchrun()
    mode = resume_mode(cfg.resume, torchrun)
    if not (env.is_main or (mode == "auto" and env.local_rank == 0)):
        return cfg
    output = Path(cfg.output)
    if mode.startswith("s3://"):
        say(f"downloading {mode} into {output}")
        return dataclasses.replace(cfg, resume=str(s3.download_run(mode, output)))
    if mode == "auto" and cfg.s3_uri and not (output / CHECKPOINT_FILE).is_file():
        found = s3.find_checkpoint(cfg.s3_uri)
        if found:
            say(f"no {CHECKPOINT_FILE} in {output}: downloading {found}")
            s3.download_run(found, output)
    return cfg


def _open_sync(cfg: TrainConfig, say: Callable[[str], None]) -> s3.RunSync | None:
    if cfg.kms_key and not cfg.s3_uri:
        raise UserError("--kms-key encrypts what --s3-uri uploads; add --s3-uri s3://bucket/prefix")
    if not (cfg.s3_uri and ddp.env_from().is_main):
        return None
    sync = s3.RunSync(cfg.s3_uri, cfg.output, cfg.logdir, cfg.kms_key or None, log=say)
    try:
        sync.preflight(cfg.resume, ddp.under_torchrun())
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
) -> FitResult:
    """loop.fit with remote resume, the S3 mirror, and the spot/SIGTERM stop (see module doc).

    interrupted=True in the result: a notice, SIGTERM or should_stop stopped it; the last
    completed epoch's checkpoint is on disk (and in S3, uploaded before this returns).
    """
    say = console.print if (console is not None and ddp.env_from().is_main) else (lambda msg: None)
    sync = _open_sync(cfg, say)
    watcher = SpotWatcher(spot_watch, spot_poll_seconds, log_line=say)
    try:
        cfg = fetch_remote_checkpoint(cfg, say)
        watcher.start()
        with StopOnSigterm() as sigterm:
            stops = [watcher.should_stop, sigterm.received.is_set, *([should_stop] if should_stop else [])]
            result = fit(cfg, console=console, should_stop=lambda: any(f() for f in stops),
                         on_epoch=sync.on_epoch if sync else None)
    except BaseException as exc:
        if sync is not None:
            if isinstance(exc, Exception) and not isinstance(exc, s3.S3Error):
                sync.abort()  # a crash: still save what the last epoch left
            else:
                sync.uploader.close(discard=True)  # S3 itself failed, or Ctrl-C: do not wait on uploads
        raise
    finally:
        watcher.stop()
    if sync is not None and result.already_finished:
        sync.uploader.close(discard=True)  # nothing changed: nothing to upload
    elif sync is not None:
        seconds = sync.finish(result.logdir)
        say(f"{result.output} and the TensorBoard logs are in {sync.prefix} ({sync.uploader.uploads} uploads; {seconds:.1f} s at exit)")
    if result.interrupted:
        say(_stopped_line(cfg, result, watcher, sigterm.received.is_set(), sync))
    return result


def _stopped_line(cfg: TrainConfig, result: FitResult, watcher: SpotWatcher, sigterm: bool, sync) -> str:
    done = len(result.history)
    where = sync.prefix.child(CHECKPOINT_FILE) if sync else Path(cfg.output) / CHECKPOINT_FILE
    notice = watcher.notice
    took = f" in {time.monotonic() - notice.seen_at:.1f} s" if notice else ""
    if notice:
        what = f"a spot interruption notice ({notice.action} at {notice.time})"
    elif sigterm:
        what = "SIGTERM"
    else:
        what = "a stop request (a spot notice or SIGTERM seen by another process, or the caller's should_stop)"
    kept = f"the checkpoint of epoch {done} is in {where}" if done else "no epoch had finished, so there is no checkpoint yet"
    return (
        f"[bold yellow]stopped by {what}[/bold yellow]{took}: {done} of {cfg.epochs} epochs done, {kept}. "
        f"Exit code {EXIT_INTERRUPTED}. Continue on any instance with the same command plus --resume auto"
        + (f" (settings: {sync.prefix.child(CONFIG_FILE)})" if sync else "")
    )
