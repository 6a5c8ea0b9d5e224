"""torchrun on one GPU: NCCL and an FSDP2-sharded policy give the losses of a plain process. CUDA
only (skipped without a GPU)."""

import os
import subprocess
import sys

import pytest
import torch

from tests.test_distributed import _free_port, _losses

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sft(run_dir, torchrun: bool) -> subprocess.CompletedProcess:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
               "--master-port", str(_free_port())] if torchrun else [sys.executable])
    # fp32 weights and compute: one rank's FSDP2 step is then the plain step up to summation order
    cmd = [*launch, "-m", "polyfast", "sft", "configs/demo_sft.yaml", f"run_dir={run_dir}",
           "train.max_steps=4", "train.log_every=1", "train.progress=false", "data.val=null",
           "train.save_every=2", "train.device=cuda", "model.dtype=float32"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240, check=False)


def test_torchrun_with_nccl_matches_one_process(tmp_path):
    one = _sft(tmp_path / "one", torchrun=False)
    assert one.returncode == 0, one.stderr[-3000:]
    nccl = _sft(tmp_path / "nccl", torchrun=True)
    assert nccl.returncode == 0, nccl.stderr[-3000:]
    expected, got = _losses(tmp_path / "one"), _losses(tmp_path / "nccl")
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-4), (step, got, expected)
    # the sharded run wrote its checkpoint through DCP, one shard for its one rank
    ckpts = os.listdir(tmp_path / "nccl" / "checkpoints")
    assert ckpts and all(os.path.isfile(tmp_path / "nccl" / "checkpoints" / c / "__0_0.distcp")
                         for c in ckpts)

