"""Many processes through PyTorch's own stack: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK, the
policy is sharded with FSDP2 (``fully_shard`` per decoder layer, then the root), NCCL on GPUs and
gloo on CPUs.

Every rank builds the same global packing (it is a pure function of the data, the seed and the
epoch) and takes every world-th pack of each step, so each bucket's packs stay whole and the step's
normaliser (the sum of w_b over all ranks' examples) is known on every rank without communication.
FSDP averages gradients over ranks; each rank's loss is scaled by the world size so that the
averaged gradient is the gradient of the one global step loss.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (nothing to do in a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local), device


def shard_model(model, device: torch.device, mixed_precision: bool = True):
    """FSDP2: each decoder layer, then the root (embeddings, final norm, head). ``model`` is the
    polyfast.model.TrunkHead around the causal LM, so the loss runs inside the root's forward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if device.type == "cuda" and mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                   reduce_dtype=torch.float32)
    for layer in model.lm.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def all_reduce_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        x = x.clone()
        dist.all_reduce(x)
    return x


def full_state_dict(model, info: DistInfo) -> dict | None:
    """The unsharded state dict on CPU, on rank 0 (None elsewhere); a collective."""
    if not info.enabled:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if info.main else None


def agree(value, info: DistInfo | None = None):
    """Rank 0's ``value`` on every rank (a collective under torchrun; itself in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or (info is not None and not info.enabled):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
