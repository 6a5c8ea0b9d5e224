"""Two processes (gloo on CPU, FSDP2-sharded policy) give the losses of one process."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

STEPS = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["loss"] for r in rows if r.get("event") == "train"]


def _trainer(kind, run_dir, grad_accum, sft_path=None):
    from polyfast.config import HDPOConfig, load_config, SFTConfig
    from polyfast.data import byte_tokenizer
    if kind == "sft":
        from polyfast.train.sft import SFTTrainer
        from tests.test_sft import TINY, _data
        tok = byte_tokenizer()
        cfg = load_config(SFTConfig, None, [], extra={
            **TINY, "run_dir": run_dir, "data.max_tokens": 1024, "train.max_steps": STEPS,
            "train.log_every": 1, "train.grad_accum": grad_accum, "train.num_threads": 1})
        return SFTTrainer(cfg, data=_data(tok), tokenizer=tok)
    from polyfast.train.hdpo import HDPOTrainer
    from tests.test_hdpo import _pairs
    cfg = load_config(HDPOConfig, None, [], extra={
        "model.path": sft_path, "run_dir": run_dir, "hdpo.distance": "feature",
        "hdpo.min_bucket_size": 3, "train.lr": 1e-4, "train.max_steps": STEPS, "train.log_every": 1,
        "train.grad_accum": grad_accum, "train.progress": False, "train.num_threads": 1,
        "data.max_tokens": 2048})
    return HDPOTrainer(cfg, pairs=_pairs(40, 7))


def _worker(rank, world, port, kind, run_dir, sft_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        _trainer(kind, run_dir, 1, sft_path).fit()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def sft_export(tmp_path_factory):
    tr = _trainer("sft", str(tmp_path_factory.mktemp("base") / "sft"), 1)
    return tr.fit()["summary"]["export"]


@pytest.mark.parametrize("kind", ["sft", "hdpo"])
def test_two_processes_match_one(kind, tmp_path, sft_export):
    one = _trainer(kind, str(tmp_path / "one"), 2, sft_export)  # 2 packs per step, as 2 ranks x 1
    one.fit()
    expected = _losses(one.cfg.run_dir)
    two = str(tmp_path / "two")
    mp.spawn(_worker, args=(2, _free_port(), kind, two, sft_export), nprocs=2, join=True)
    got = _losses(two)
    assert len(got) == len(expected) == STEPS
    for step, (a, b) in enumerate(zip(got, expected), start=1):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), (step, got, expected)
    # the export gathered on rank 0 loads and equals the single-process model's
    from transformers import AutoModelForCausalLM
    m1 = AutoModelForCausalLM.from_pretrained(os.path.join(one.cfg.run_dir, "final"))
    m2 = AutoModelForCausalLM.from_pretrained(os.path.join(two, "final"))
    for (n, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert (p1 - p2).abs().max() <= 1e-5 * max(p1.abs().max(), 1e-6) + 1e-7, n
