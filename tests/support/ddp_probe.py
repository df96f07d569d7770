"""Test-only torchrun entry point: the real `ec2train fit`, recording what each rank trains on.

    torchrun ... tests/ddp_probe.py RECORD_DIR fit --data ... (any `ec2train fit` options)

Every training sample a rank loads (its (index, per-sample seed) key) is appended, in order, to
RECORD_DIR/rank<R>.json when the process ends. The seed tells the test which epoch it was in.
The library is untouched: the recording is a subclass swapped in here, in the test script.
"""

from __future__ import annotations

import atexit
import json
import sys
from pathlib import Path

from ec2train import cli, ddp
from ec2train.data import ImageDataset, loaders

record_dir = Path(sys.argv[1])
seen: list[list[int]] = []


class RecordingDataset(ImageDataset):
    def __getitem__(self, key):
        if isinstance(key, tuple):  # training keys are (index, seed); evaluation keys are plain ints
            seen.append([int(key[0]), int(key[1])])
        return super().__getitem__(key)


def _write() -> None:
    record_dir.mkdir(parents=True, exist_ok=True)
    (record_dir / f"rank{ddp.env_from().rank}.json").write_text(json.dumps(seen))


loaders.ImageDataset = RecordingDataset  # what data.train_dataset builds
atexit.register(_write)
cli.main(sys.argv[2:])
