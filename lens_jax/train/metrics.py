"""Metrics writers: JSONL (one object per logged step) and TensorBoard event files."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Mapping


def _clean(v):
    v = float(v) if hasattr(v, "__float__") and not isinstance(v, (int, bool)) else v
    return None if isinstance(v, float) and not math.isfinite(v) else v


class MetricsWriter:
    """Appends to `workdir/metrics.jsonl` and `workdir/tensorboard/`. On resume, lines past the
    restored step (written by a run that was killed before its next checkpoint) are dropped so the
    file tells one consistent history."""

    def __init__(self, workdir: str | pathlib.Path, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, metrics: Mapping[str, float]):
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(f"train/{k}", v, step)
        self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
