"""Run logs: TensorBoard event files (tensorboardX, no TensorFlow) and a JSON-lines twin.

Only process 0 writes; other processes get a writer that does nothing. Scalars go to
`<workdir>/tensorboard` and, one JSON object per call, to `<workdir>/train_log.jsonl`.
"""
from __future__ import annotations

import json
import pathlib
from typing import Optional

import jax
import numpy as np


class MetricWriter:
    """`scalars(step, {name: value})`, `image(step, name, hwc_uint8)`, `close()`."""

    def __init__(self, workdir: str | pathlib.Path, enabled: Optional[bool] = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = self._log = None
        if self.enabled:
            from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

            workdir = pathlib.Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(str(workdir / "tensorboard"))
            self._log = open(workdir / "train_log.jsonl", "a")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self._tb.add_scalar(name, float(value), step)
        self._log.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")
        self._log.flush()

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        """An HWC uint8 image (e.g. a sample grid)."""
        if self.enabled:
            self._tb.add_image(name, image, step, dataformats="HWC")

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._log.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._log.close()
            self.enabled = False
