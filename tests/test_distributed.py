"""Two processes (gloo on CPU, FSDP2-sharded policy) give the losses of one process, and a
checkpoint written by two processes resumes in one."""

import json
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow  # torchrun / two processes

STEPS = 5
SAVE = {"train.save_every": 3}  # a DCP checkpoint after step 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if r.get("event") == "train"}


def _trainer(kind, run_dir, grad_accum, sft_path=None, over=None):
    from polyfast.config import HDPOConfig, SFTConfig, load_config
    from polyfast.data import byte_tokenizer
    common = {"run_dir": run_dir, "train.max_steps": STEPS, "train.log_every": 1,
              "train.grad_accum": grad_accum, "train.num_threads": 1, "train.progress": False,
              **(over or {})}
    if kind == "sft":
        from polyfast.train.sft import SFTTrainer
        from tests.test_sft import TINY, sft_data
        tok = byte_tokenizer()
        cfg = load_config(SFTConfig, None, [], extra={**TINY, "data.max_tokens": 1024, **common})
        return SFTTrainer(cfg, data=sft_data(tok), tokenizer=tok)
    from polyfast.train.hdpo import HDPOTrainer
    from tests.test_hdpo import hdpo_pairs
    cfg = load_config(HDPOConfig, None, [], extra={
        "model.path": sft_path, "hdpo.distance": "feature", "hdpo.min_bucket_size": 3,
        "train.lr": 1e-4, "data.max_tokens": 2048, **common})
    return HDPOTrainer(cfg, pairs=hdpo_pairs(40, 7))


def _worker(rank, world, port, kind, run_dir, sft_path, over):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        _trainer(kind, run_dir, 1, sft_path, over).fit()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def sft_export(tmp_path_factory):
    tr = _trainer("sft", str(tmp_path_factory.mktemp("base") / "sft"), 1)
    return tr.fit()["summary"]["export"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, sft_export):
    """The run directory of a 2-process run of each kind (made once)."""
    runs = {}

    def run(kind, over=None):
        key = (kind, json.dumps(over or {}, sort_keys=True))
        if key not in runs:
            run_dir = str(tmp_path_factory.mktemp(f"two_{kind}") / "run")
            mp.spawn(_worker, args=(2, _free_port(), kind, run_dir, sft_export, over), nprocs=2,
                     join=True)
            runs[key] = run_dir
        return runs[key]
    return run


@pytest.mark.parametrize("kind, over", [
    ("sft", SAVE),
    ("hdpo", None),  # reference replicated on each rank
    ("hdpo", {"hdpo.frozen": "shard", "hdpo.distance": "lm"}),  # reference and LM critic sharded
    ("sft", {**SAVE, "model.lora.r": 4}),  # LoRA: frozen base and adapters in one FSDP2 unit
    ("hdpo", {"model.lora.r": 4, "hdpo.distance": "lm"}),  # the reference: adapters off
], ids=["sft", "hdpo", "hdpo-sharded-frozen", "sft-lora", "hdpo-lora"])
def test_two_processes_match_one(kind, over, tmp_path, sft_export, two_process_run):
    # one process with 2 packs per step, as 2 ranks with 1 each (hdpo.frozen means nothing there)
    one = _trainer(kind, str(tmp_path / "one"), 2, sft_export, over)
    one.fit()
    expected = _losses(one.cfg.run_dir)
    two = two_process_run(kind, over)
    got = _losses(two)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (step, got, expected)
    # the export gathered on rank 0 loads and equals the single-process model's (with LoRA: the
    # adapter, merged into its base on load)
    from polyfast.model import load_pretrained
    m1 = load_pretrained(os.path.join(one.cfg.run_dir, "final"), "one")
    m2 = load_pretrained(os.path.join(two, "final"), "two")
    for (n, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert (p1 - p2).abs().max() <= 1e-5 * max(p1.abs().max(), 1e-6) + 1e-7, n


def test_a_two_process_checkpoint_resumes_in_one_process(tmp_path, two_process_run):
    two = two_process_run("sft", SAVE)
    run = tmp_path / "resumed"
    shutil.copytree(os.path.join(two, "checkpoints"), run / "checkpoints")
    (ckpt,) = os.listdir(run / "checkpoints")
    with open(run / "checkpoints" / ckpt / "trainer_state.json") as f:
        state = json.load(f)
    assert (state["step"], state["world_size"]) == (3, 2)
    # one process, two packs per step: the same steps as two ranks with one pack each
    resumed = _trainer("sft", str(run), 2, over={**SAVE, "train.resume": True})
    resumed.fit()
    got, expected = _losses(str(run)), _losses(two)
    assert sorted(got) == [4, 5]
    for step in got:  # the optimizer state came back too: step 5 depends on Adam's moments
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (step, got, expected)


def test_torchrun_launches_the_cli(tmp_path):
    import subprocess
    import sys
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "-m", "polyfast", "sft", "configs/demo_sft.yaml",
           f"run_dir={run}", "train.max_steps=2", "train.save_every=1", "train.num_threads=1",
           "train.log_every=1", "train.progress=false", "data.val=null", "model.tiny.num_layers=1"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("steps in") == 1  # one summary, from rank 0
    shards = sorted(f for f in os.listdir(run / "checkpoints" / "step_000001") if f.endswith(".distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own
    assert sorted(_losses(run)) == [1, 2] and os.path.exists(run / "final" / "config.json")
