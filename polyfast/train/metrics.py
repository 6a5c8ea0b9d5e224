"""metrics.jsonl writer and the per-bucket tables printed at the end of a run. On resume the log is
read back as JSON lines (a line that does not decode to an object, as one cut short by a kill,
is dropped)."""

from __future__ import annotations

import json
import os
import time


class MetricsLog:
    """Appends one JSON object per line to ``run_dir/metrics.jsonl``.

    A fresh run starts the file anew. A run resumed from step ``resume_step`` keeps the rows up to
    that step (and those without one, such as the data row) and drops the rows of the steps it is
    about to train again, so that every step keeps a single row. ``report_to`` adds sinks that
    get every row too (``tensorboard``)."""

    def __init__(self, run_dir: str, resume_step: int | None = None, enabled: bool = True,
                 report_to: list[str] = ()):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled  # only rank 0 writes in a multi-process run
        self.sinks = [TensorBoardSink(run_dir, resume_step)
                      for name in report_to if name == "tensorboard" and enabled]
        self.kept: list[dict] = []  # the rows a resumed run keeps
        if not enabled or not os.path.exists(self.path):
            return
        if resume_step is None:
            os.remove(self.path)
            return
        kept = []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if not isinstance(row, dict):
                    continue
                if row.get("event") != "summary" and row.get("step", 0) <= resume_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
                    self.kept.append(row)
        with open(self.path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {"time": round(time.time(), 3), **row}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        for sink in self.sinks:
            sink.write(row)

    def first(self, event: str) -> dict | None:
        """The first kept row of ``event`` (a resumed run's evaluation before training), without
        its bookkeeping keys."""
        row = next((r for r in self.kept if r.get("event") == event), None)
        return None if row is None else {k: v for k, v in row.items()
                                         if k not in ("event", "step", "time")}

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class TensorBoardSink:
    """The numbers of metrics.jsonl as TensorBoard scalars under ``run_dir/tensorboard``: each
    train or eval row's numeric values (nested ones such as per-bucket losses as
    ``bucket_loss/<bucket>``) at the row's step."""

    def __init__(self, run_dir: str, resume_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            from ..errors import ConfigError
            raise ConfigError("train.report_to", "tensorboard is not installed: pip install "
                              "polyfast[tensorboard] (or pip install tensorboard), or remove "
                              "tensorboard from train.report_to") from e
        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"),
                                    purge_step=resume_step)

    def write(self, row: dict) -> None:
        if row.get("event") not in ("train", "eval") or "step" not in row:
            return
        prefix = "train" if row["event"] == "train" else "eval"
        for tag, value in _scalars(row, prefix):
            self.writer.add_scalar(tag, value, row["step"])

    def close(self) -> None:
        self.writer.close()


def _scalars(row: dict, prefix: str):
    for k, v in row.items():
        if k in ("event", "step", "time"):
            continue
        if isinstance(v, dict):
            yield from _scalars(v, f"{prefix}/{k}")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield f"{prefix}/{k}", float(v)
