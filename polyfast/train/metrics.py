"""metrics.jsonl, and the experiment trackers that get the same numbers (``train.report_to``:
TensorBoard, Weights & Biases, MLflow, Trackio).

Files read back on resume: metrics.jsonl as JSON lines (a line that does not decode to an object,
as one cut short by a kill, is dropped) and trackers.json (JSON: each tracker's run id and the
last step it got; one that does not decode starts new tracker runs, with a warning)."""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass

log = logging.getLogger("polyfast")


class MetricsLog:
    """Appends one JSON object per line to ``run_dir/metrics.jsonl``.

    A fresh run starts the file anew. A run resumed from step ``resume_step`` keeps the rows up to
    that step (and those without one, such as the data row) and drops the rows of the steps it is
    about to train again, so that every step keeps a single row. ``report_to`` adds the trackers
    (``TRACKERS``) that get the numbers of every train and eval row too, the config once, and on a
    resume the same tracker run again (``trackers.json`` remembers each one's run)."""

    def __init__(self, run_dir: str, resume_step: int | None = None, enabled: bool = True,
                 report_to: list[str] = (), run_name: str | None = None,
                 project: str = "polyfast", config: dict | None = None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled  # only rank 0 writes in a multi-process run
        self.sinks = []
        if enabled and report_to:
            state = TrackerState(run_dir, resume_step is not None)
            run = RunInfo(run_dir, run_name or os.path.basename(os.path.abspath(run_dir)), project,
                          config or {}, resume_step)
            self.sinks = [TRACKERS[name](run, state) for name in report_to]
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


# -- trackers ----------------------------------------------------------------------------------


@dataclass
class RunInfo:
    """What every tracker is told of the run."""
    run_dir: str
    name: str
    project: str
    config: dict            # the resolved config, nested
    resume_step: int | None  # None: a fresh run


class TrackerState:
    """``run_dir/trackers.json``: per tracker, its run's id and the last step it got of each
    event, so that a resumed run continues the same tracker run and sends no step twice (the
    steps trained again after a checkpoint are already there, with the same values). Read as
    JSON; a fresh run starts it anew."""

    def __init__(self, run_dir: str, resumed: bool):
        self.path = os.path.join(run_dir, "trackers.json")
        self.data: dict = {}
        if resumed and os.path.exists(self.path):
            from ..errors import DataError
            from ..files import read_json
            try:
                data = read_json(self.path, "polyfast's trackers.json")
            except DataError as e:
                log.warning("%s; the trackers start new runs", e)
                data = {}
            self.data = data if isinstance(data, dict) else {}
        elif os.path.exists(self.path):
            os.remove(self.path)

    def get(self, tracker: str) -> dict:
        entry = self.data.get(tracker)
        return entry if isinstance(entry, dict) else {}

    def update(self, tracker: str, **values) -> None:
        self.data.setdefault(tracker, {}).update(values)
        with open(self.path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(self.data, f)
        os.replace(self.path + ".tmp", self.path)


def _tracker_module(name: str, module: str):
    """The tracker's module; its absence is a ConfigError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        from ..errors import ConfigError
        raise ConfigError("train.report_to", f"{name} is not installed: pip install "
                          f"polyfast[{name}] (or pip install {name}), or remove {name} from "
                          "train.report_to") from e


_NOT_SCALARS = {"steps", "steps_run", "resumed_from_step"}  # a summary's bookkeeping


class Tracker:
    """A metrics sink: the numbers of each train and eval row at the row's step (nested values
    as ``train/bucket_loss/<bucket>``), those of the summary under ``summary/``. Subclasses open
    their run (``__init__``), send one step's scalars (``send``) and close it."""

    name = ""

    def __init__(self, run: RunInfo, state: TrackerState):
        self.run, self.state = run, state
        self.last = dict(state.get(self.name).get("last_step", {}))  # event -> step

    def write(self, row: dict) -> None:
        event = row.get("event")
        if event not in ("train", "eval", "summary"):
            return
        step = row.get("step", row.get("steps"))
        if not isinstance(step, int) or step <= self.last.get(event, -1):
            return  # (a resumed run's step the tracker already has)
        scalars = dict(_scalars({k: v for k, v in row.items() if k not in _NOT_SCALARS}, event))
        if scalars:
            self.send(scalars, step)
        self.last[event] = step
        self.state.update(self.name, last_step=self.last)

    def send(self, scalars: dict, step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoardSink(Tracker):
    """TensorBoard scalars under ``run_dir/tensorboard`` (a resumed run purges the steps after
    its checkpoint and writes them again)."""

    name = "tensorboard"

    def __init__(self, run: RunInfo, state: TrackerState):
        super().__init__(run, state)
        board = _tracker_module("tensorboard", "torch.utils.tensorboard")
        self.writer = board.SummaryWriter(os.path.join(run.run_dir, "tensorboard"),
                                          purge_step=run.resume_step)

    def write(self, row: dict) -> None:  # every row again: purge_step dropped the replayed steps
        if row.get("event") in ("train", "eval") and "step" in row:
            self.send(dict(_scalars(row, row["event"])), row["step"])

    def send(self, scalars: dict, step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink(Tracker):
    """Weights & Biases: the run named ``train.run_name`` in project ``train.project``, files
    under ``run_dir/wandb``; ``WANDB_MODE=offline`` keeps it on disk (``wandb sync`` later)."""

    name = "wandb"

    def __init__(self, run: RunInfo, state: TrackerState):
        super().__init__(run, state)
        wandb = _tracker_module("wandb", "wandb")
        known = state.get(self.name).get("id")
        self.wb = wandb.init(project=run.project, name=run.name, dir=run.run_dir,
                             config={**run.config, "run_dir": os.path.abspath(run.run_dir)},
                             id=known, resume="allow" if known else None)
        state.update(self.name, id=self.wb.id)

    def send(self, scalars: dict, step: int) -> None:
        self.wb.log(scalars, step=step)

    def close(self) -> None:
        self.wb.finish()


class MlflowSink(Tracker):
    """MLflow: a run named ``train.run_name`` in the experiment ``train.project`` of the tracking
    server ``MLFLOW_TRACKING_URI`` names (mlflow's default without it); the config as flattened
    params, run_dir as a tag. Metric names keep letters, digits and ``_-. :/`` (others become
    ``_``: a bucket ``en|single|qa|short`` is ``en_single_qa_short``)."""

    name = "mlflow"

    def __init__(self, run: RunInfo, state: TrackerState):
        super().__init__(run, state)
        from ..config import flatten
        self.client = _tracker_module("mlflow", "mlflow.tracking").MlflowClient()
        known = state.get(self.name).get("run_id")
        if known:
            self.run_id = known
            self.client.update_run(known, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(run.project)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(run.project)
            created = self.client.create_run(exp_id, run_name=run.name, tags={
                "run_dir": os.path.abspath(run.run_dir)})
            self.run_id = created.info.run_id
            from mlflow.entities import Param
            params = [Param(k, json.dumps(v) if not isinstance(v, str) else v)
                      for k, v in flatten(run.config).items()]
            for i in range(0, len(params), 100):  # (mlflow's batch limit)
                self.client.log_batch(self.run_id, params=params[i:i + 100])
            state.update(self.name, run_id=self.run_id)

    def send(self, scalars: dict, step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), v, now, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _mlflow_key(key: str) -> str:
    return re.sub(r"[^\w\-. :/]", "_", key)


class TrackioSink(Tracker):
    """Trackio: the run ``train.run_name`` of the project ``train.project`` (local by default,
    ``TRACKIO_DIR``; a Space with trackio's own settings)."""

    name = "trackio"

    def __init__(self, run: RunInfo, state: TrackerState):
        super().__init__(run, state)
        self.trackio = trackio = _tracker_module("trackio", "trackio")
        resumed = bool(state.get(self.name))
        self.tr = trackio.init(project=run.project, name=run.name,
                               config={**run.config, "run_dir": os.path.abspath(run.run_dir)},
                               resume="allow" if resumed else "never")
        state.update(self.name, name=run.name)

    def send(self, scalars: dict, step: int) -> None:
        self.tr.log(scalars, step=step)

    def close(self) -> None:
        self.trackio.finish()  # (the module's: it also forgets the run, which Run.finish does not,
        # so trackio's exit hook does not finish it a second time)


TRACKERS = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MlflowSink,
            "trackio": TrackioSink}


def _scalars(row: dict, prefix: str):
    for k, v in row.items():
        if k in ("event", "step", "time"):
            continue
        if isinstance(v, dict):
            yield from _scalars(v, f"{prefix}/{k}")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield f"{prefix}/{k}", float(v)
