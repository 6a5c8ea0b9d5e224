"""Packed forward (one row, cu_seqlens) equals per-example forward, for tiny real architectures."""

import pytest
import torch

from polyfast.attention import ATTN_IMPLEMENTATION
from polyfast.config import ModelConfig, TinyModelConfig
from polyfast.data import byte_tokenizer, collate, demo_records, encode_records
from polyfast.model import hidden_states, load_model, set_packed


def gemma2_model(tok):
    from transformers import AutoModelForCausalLM, Gemma2Config
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=24,
                       attn_logit_softcapping=20.0, final_logit_softcapping=15.0,
                       pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=ATTN_IMPLEMENTATION)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_packed_forward_equals_per_example_forward(arch):
    tok = byte_tokenizer()
    if arch == "gemma2":
        model = gemma2_model(tok)
    else:
        model = load_model(ModelConfig(tiny=TinyModelConfig(arch=arch, hidden_size=64, num_layers=2,
                                                            num_heads=4, num_kv_heads=2,
                                                            intermediate_size=96)), tok)
    model.eval()
    recs = demo_records("val")[::9][:5]
    exs = [e for e in encode_records(tok, recs)]
    names = sorted({e.bucket for e in exs})
    packed = collate(exs, names)
    with torch.no_grad():
        h_packed = hidden_states(model, packed)  # (T, H)
        # the reference: transformers' own attention (eager for gemma2, which softcaps scores)
        model.set_attn_implementation("eager" if arch == "gemma2" else "sdpa")
        worst = 0.0
        for i, ex in enumerate(exs):
            one = model.model(input_ids=torch.tensor([ex.input_ids])).last_hidden_state[0]
            s, e = packed.cu_seqlens[i].item(), packed.cu_seqlens[i + 1].item()
            worst = max(worst, (h_packed[s:e] - one).abs().max().item())
    assert worst <= 1e-5, f"{arch}: packed vs per-example max abs diff {worst:.2e}"
    assert max(len(e) for e in exs) > 24  # the sliding window (gemma2) was exercised


def test_unpacked_rows_get_plain_causal_attention():
    tok = byte_tokenizer()
    model = load_model(ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2,
                                                        num_kv_heads=1, intermediate_size=64)), tok)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    out = model.model(input_ids=ids).last_hidden_state  # unpacked single row: plain causal
    set_packed(model, False)
    ref = model.model(input_ids=ids).last_hidden_state
    assert (out - ref).abs().max() <= 1e-5


def test_varlen_kernels_only_get_inputs_they_take():
    # the CUDA varlen kernels take one 16-bit dtype and head dims up to 256 (padded to a multiple
    # of 8: the tiny test models' 12 becomes 16); anything else (fp32 training) takes the loop
    from polyfast.attention import varlen_kernel_fits
    x = torch.zeros(10, 4, 64, dtype=torch.bfloat16)
    assert varlen_kernel_fits(x, x, x)
    assert varlen_kernel_fits(x.half(), x.half(), x.half())
    assert not varlen_kernel_fits(x.float(), x.float(), x.float())
    assert not varlen_kernel_fits(x, x.float(), x)
    odd = torch.zeros(10, 4, 12, dtype=torch.bfloat16)
    assert varlen_kernel_fits(odd, odd, odd)
    wide = torch.zeros(10, 4, 252, dtype=torch.bfloat16)  # padded to 256: still fits
    assert varlen_kernel_fits(wide, wide, wide)
    wider = torch.zeros(10, 4, 260, dtype=torch.bfloat16)
    assert not varlen_kernel_fits(wider, wider, wider)


def test_zero_padding_the_head_dim_leaves_attention_unchanged():
    # what the CUDA path does for head dims that are not multiples of 8, checked with SDPA
    from polyfast.attention import pad_head_dim
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, 9, 12, generator=g, dtype=torch.float64) for _ in range(3))
    scale = 12 ** -0.5
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    qp, kp, vp = (pad_head_dim(t) for t in (q, k, v))
    assert qp.shape[-1] == 16 and pad_head_dim(qp) is qp
    padded = torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, is_causal=True,
                                                              scale=scale)
    assert (padded[..., 12:] == 0).all()
    torch.testing.assert_close(padded[..., :12], plain, rtol=1e-12, atol=1e-12)
