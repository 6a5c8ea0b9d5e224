"""The end-to-end benchmark's FLOP model: model FLOPs of the sequences a step computed, what a
step is credited with, and the dense bf16 peak of known cards (for MFU).

Model FLOPs count what a mode computes: 2 x (the decoder's matmul parameters + the head) per token
and forward, plus causal attention 2 x layers x heads x head_dim x sum(len^2) (a segment of q
queries over k keys, aligned bottom-right, counts 2qk - q^2); training = 3 forwards, a frozen
reference 1 forward; activation-checkpoint recompute is not counted.
"""

from __future__ import annotations

PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
               ("L40S", 362.0), ("A10G", 125.0)]

def flops_per_forward(config, lengths: list[int], attn_sq: float | None = None) -> float:
    """Model FLOPs of one forward over sequences of ``lengths`` tokens (see the module docstring);
    ``attn_sq`` replaces sum(len^2) where segments have more keys than queries."""
    H, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or H // hq
    per_layer = H * hq * d * 2 + H * hkv * d * 2 + 3 * H * config.intermediate_size
    tokens = sum(lengths)
    if attn_sq is None:
        attn_sq = sum(n * n for n in lengths)
    return 2.0 * (L * per_layer + H * V) * tokens + 2.0 * L * hq * d * attn_sq

def step_work(lengths, tokens=None, attn_sq=None, bucket=None) -> dict:
    """What a step did: the sequence lengths it computed, the tokens it is credited with (default:
    their sum), the attention's sum(len^2) equivalent and the bucket of its packs (None: several)."""
    return {"lengths": list(lengths), "tokens": sum(lengths) if tokens is None else tokens,
            "attn_sq": attn_sq, "bucket": bucket}

def group_work(groups) -> dict:
    """A step over preference groups: credited with their pair tokens (the unshared count)."""
    lengths, attn_sq = [], 0
    for g in groups:
        P = len(g.prompt)
        for j, r in enumerate(g.responses):
            if g.shared and j > 0:  # R queries over P + R keys
                lengths.append(len(r))
                attn_sq += 2 * len(r) * (P + len(r)) - len(r) ** 2
            else:
                lengths.append(P + len(r))
                attn_sq += (P + len(r)) ** 2
    buckets = {g.bucket for g in groups}
    return step_work(lengths, sum(g.pair_tokens for g in groups), attn_sq,
                 buckets.pop() if len(buckets) == 1 else None)

def prompt_share(groups) -> dict[str, float]:
    """Per bucket, the prompts' share of the pair tokens (prompt once per side)."""
    prompt, total = {}, {}
    for g in groups:
        prompt[g.bucket] = prompt.get(g.bucket, 0) + 2 * len(g.prompt) * len(g.pairs)
        total[g.bucket] = total.get(g.bucket, 0) + g.pair_tokens
    return {b: prompt[b] / total[b] for b in sorted(total)}

def peak_flops(device: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for name, tflops in PEAK_TFLOPS:
        if name in device:
            return tflops * 1e12
    return None
