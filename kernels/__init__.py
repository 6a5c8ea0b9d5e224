"""polyfast's loss kernels. Each op: Triton kernels, launcher, autograd.Function, a chunked PyTorch
twin and a full-logits reference, with the backend chosen per call."""

from .joint_logprobs import joint_logprobs, joint_logprobs_reference, joint_logprobs_triton
from .linear_ce import (linear_ce_gemm, linear_ce_reference, linear_ce_torch, linear_ce_triton,
                        linear_cross_entropy)

__all__ = ["linear_cross_entropy", "linear_ce_reference", "linear_ce_torch", "linear_ce_triton",
           "linear_ce_gemm",
           "joint_logprobs", "joint_logprobs_reference", "joint_logprobs_triton"]
