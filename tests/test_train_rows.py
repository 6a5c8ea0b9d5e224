"""A step's train row is written after the next step is queued (so that logging waits for that
step only): the rows are those written at once, in the same order, whatever the intervals."""

import json
import os

import pytest

from tests.test_sft import sft_trainer

STEPS = 5


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _train_rows(rows):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "time")} for r in rows
            if r.get("event") == "train"]


def test_held_rows_equal_rows_written_at_once(tmp_path):
    common = {"train.max_steps": STEPS, "train.log_every": 1, "train.progress": False}
    held = sft_trainer(tmp_path / "held", **common, **{"train.eval_every": 0})
    held.fit()
    # evaluating every step writes every row at once (an evaluation waits for the device anyway)
    at_once = sft_trainer(tmp_path / "at_once", **common, **{"train.eval_every": 1})
    at_once.fit()
    a, b = _rows(held.cfg.run_dir), _rows(at_once.cfg.run_dir)
    assert [r["step"] for r in _train_rows(a)] == list(range(1, STEPS + 1))
    assert _train_rows(a) == _train_rows(b)
    # each step's train row comes before that step's evaluation
    order = [(r["event"], r["step"]) for r in b if r.get("event") in ("train", "eval")]
    for step in range(1, STEPS):
        assert order.index(("train", step)) < order.index(("eval", step))


def test_an_interrupted_run_keeps_the_row_it_held(tmp_path, monkeypatch):
    from polyfast.errors import Interrupted
    tr = sft_trainer(tmp_path, **{"train.max_steps": STEPS, "train.progress": False})
    real = tr.train_step

    def step(packs):
        if tr.step == 3:  # Ctrl-C during the fourth step: the third is whole
            raise KeyboardInterrupt
        return real(packs)
    monkeypatch.setattr(tr, "train_step", step)
    with pytest.raises(Interrupted):
        tr.fit()
    assert [r["step"] for r in _train_rows(_rows(tr.cfg.run_dir))] == [1, 2, 3]

