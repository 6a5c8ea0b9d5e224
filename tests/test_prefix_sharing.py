"""Prefix sharing: a group's prompt laid out once gives the log-probs and HDPO gradients of one
copy per response, for tiny Llama, Qwen2 and Gemma-2 (softcaps, sliding window) models."""

import dataclasses

import pytest
import torch
from polyfast.kernels import joint_logprobs

from polyfast.config import ModelConfig, TinyModelConfig
from polyfast.data import byte_tokenizer, demo_records, make_pairs
from polyfast.data.groups import GroupExample, collate_groups, encode_groups, pack_groups
from polyfast.data.pairs import PreferencePair
from polyfast.losses import hdpo_loss
from polyfast.model import head_weight, hidden_states, load_model, logit_softcap
from tests.test_packed_model import gemma2_model
from tests.utils import assert_close


def _ids(gen, n):
    return tuple(torch.randint(0, 256, (n,), generator=gen).tolist())


def make_groups():
    """Odd shapes: a one-token prompt, one-token responses, a group of three responses with two
    pairs sharing the chosen side, and a prompt longer than Gemma-2's sliding window (24)."""
    g = torch.Generator().manual_seed(1)
    return [GroupExample(_ids(g, 7), (_ids(g, 5), _ids(g, 1)), ((0, 0, 1),), "b"),
            GroupExample(_ids(g, 30), (_ids(g, 1), _ids(g, 12), _ids(g, 26)),
                         ((1, 0, 1), (2, 0, 2)), "b"),
            GroupExample(_ids(g, 1), (_ids(g, 3), _ids(g, 4)), ((3, 1, 0),), "b")]


def tiny_model(arch, tok):
    if arch == "gemma2":
        return gemma2_model(tok)
    return load_model(ModelConfig(tiny=TinyModelConfig(arch=arch, hidden_size=48, num_layers=2,
                                                       num_heads=4, num_kv_heads=2,
                                                       intermediate_size=96)), tok)


def loss_and_grads(model, pack):
    """Per-response log-prob sums and the gradients of an HDPO loss over the pack's pairs."""
    batch, sc = collate_groups(pack, ["b"])
    model.zero_grad()
    h = hidden_states(model, batch).index_select(0, sc.rows)
    sums, counts = joint_logprobs([h], [head_weight(model)], sc.targets, sc.segments,
                                  sc.num_segments, softcaps=[logit_softcap(model)])
    c, r = sc.chosen, sc.rejected
    P = len(sc.pair_index)
    ref = torch.linspace(-3.0, 3.0, 2 * P).view(2, P)  # a reference that disagrees per pair
    loss, _ = hdpo_loss(sums[0, c], sums[0, r], ref[0], ref[1], torch.rand(P), torch.rand(P),
                        torch.linspace(0.5, 2.0, P), counts[c], beta=0.5)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return sums.detach()[0], counts, grads, batch


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_shared_prefix_gives_the_unshared_logprobs_and_gradients(arch):
    tok = byte_tokenizer()
    model = tiny_model(arch, tok)
    torch.manual_seed(0)
    shared = loss_and_grads(model, make_groups())
    torch.manual_seed(0)  # the same random distances
    unshared = loss_and_grads(model, [dataclasses.replace(g, shared=False) for g in make_groups()])
    assert shared[3].kv_index is not None and unshared[3].kv_index is None
    assert shared[3].num_tokens == 90 and unshared[3].num_tokens == 158
    assert torch.equal(shared[1], unshared[1])
    assert_close(shared[0], unshared[0], 1e-5, f"{arch} log-prob sums")
    assert_close(shared[2], unshared[2], 1e-5, f"{arch} gradients")
    # and both are what transformers' own attention gives each [prompt | response] alone
    model.set_attn_implementation("eager" if arch == "gemma2" else "sdpa")
    expected = []
    with torch.no_grad():
        for g in make_groups():
            for resp in g.responses:
                ids = torch.tensor([g.prompt + resp])
                logits = (model.model(input_ids=ids).last_hidden_state[0].double()
                          @ head_weight(model).double().T)
                if logit_softcap(model):
                    cap = logit_softcap(model)
                    logits = cap * torch.tanh(logits / cap)
                lp = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
                expected.append(lp[len(g.prompt) - 1:].sum())
    assert_close(shared[0], torch.stack(expected), 1e-5, f"{arch} against per-sequence forwards")


def test_shared_layout_positions_keys_and_rows():
    g = GroupExample((10, 11, 12), ((20, 21), (30,), (40, 41, 42)), ((5, 0, 1), (6, 0, 2)), "b")
    batch, sc = collate_groups([g], ["b"])
    assert batch.input_ids[0].tolist() == [10, 11, 12, 20, 21, 30, 40, 41, 42]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 3, 4, 5]  # restart after the prompt
    assert batch.cu_seqlens.tolist() == [0, 5, 6, 9]               # queries [p|r1], [r2], [r3]
    assert batch.kv_index.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 5, 0, 1, 2, 6, 7, 8]
    assert batch.cu_seqlens_k.tolist() == [0, 5, 9, 15] and batch.max_seqlen_k == 6
    assert sc.rows.tolist() == [2, 3, 2, 2, 6, 7]  # a response's first token: the last prompt row
    assert sc.targets.tolist() == [20, 21, 30, 40, 41, 42]
    assert sc.segments.tolist() == [0, 0, 1, 2, 2, 2]
    assert sc.chosen.tolist() == [0, 0] and sc.rejected.tolist() == [1, 2]
    assert sc.pair_index == [5, 6]
    assert batch.labels[0].tolist() == [-100] * 3 + [20, 21, 30, 40, 41, 42]
    unshared, usc = collate_groups([dataclasses.replace(g, shared=False)], ["b"])
    assert unshared.kv_index is None and unshared.num_tokens == 15
    assert usc.targets.tolist() == sc.targets.tolist()
    assert usc.rows.tolist() == [2, 3, 7, 11, 12, 13]


def _pair(rec, rejected, **kw):
    return PreferencePair(rec, rejected, **kw)


def test_pairs_of_one_prompt_form_one_group_with_each_response_once():
    tok = byte_tokenizer()
    recs = [r for r in demo_records("train") if r.length_bin == "short"][:2]
    a, b = recs
    pairs = [_pair(a, "first try"), _pair(b, "other"), _pair(a, "second try"), _pair(a, "third")]
    groups, counts = encode_groups(tok, pairs, system="profile", max_tokens=4096)
    assert counts["kept"] == 4 and counts["groups"] == 2
    ga = next(g for g in groups if g.record_id == a.id)
    assert [i for i, _, _ in ga.pairs] == [0, 2, 3]
    assert len(ga.responses) == 4  # the human response once, and three rejected ones
    assert {c for _, c, _ in ga.pairs} == {0}
    assert ga.pair_tokens == sum(2 * len(ga.prompt) + len(ga.responses[0]) + len(ga.responses[r])
                                 for _, _, r in ga.pairs)
    assert ga.computed_tokens == len(ga.prompt) + sum(len(r) for r in ga.responses)
    assert len(ga) == sum(len(ga.prompt) + len(r) for r in ga.responses)  # packing: unshared
    # the unshared layout of the same group: one prompt per response, the same data
    flat, _ = encode_groups(tok, pairs, system="profile", max_tokens=4096, shared=False)
    assert [dataclasses.replace(g, shared=True) for g in flat] == groups


def test_a_group_longer_than_a_pack_is_split_and_truncation_is_shared_by_both_sides():
    tok = byte_tokenizer()
    rec = next(r for r in demo_records("train") if r.length_bin == "short")
    pairs = [_pair(rec, "x" * 40 + str(k)) for k in range(16)]
    full, _ = encode_groups(tok, pairs, system="profile", max_tokens=8192)
    (g,) = full
    cap = 3 * (len(g.prompt) + max(len(r) for r in g.responses))  # three responses, untruncated
    assert len(g) > cap
    layouts = []
    for shared in (True, False):
        groups, counts = encode_groups(tok, pairs, system="profile", max_tokens=cap, shared=shared)
        assert counts["kept"] == 16 and counts["truncated_prompt"] == 0
        assert all(len(x) <= cap for x in groups)  # packing counts the unshared length
        assert sorted(i for x in groups for i, _, _ in x.pairs) == list(range(16))
        assert [len(x.pairs) for x in groups] == [2] * 8  # the human response and two samples
        assert all(x.prompt == g.prompt for x in groups)
        layouts.append([dataclasses.replace(x, shared=True) for x in groups])
    assert layouts[0] == layouts[1]  # the same groups in both layouts: the same packs
    # a long rejected side cuts the prompt for both sides of its pair (each side fits half a pack)
    long_side = "y" * 300
    (t,), counts = encode_groups(tok, [_pair(rec, long_side)], system="profile",
                                 max_tokens=2 * (len(g.prompt) + 100))
    assert counts["truncated_prompt"] == 1 and t.truncated > 0
    assert len(t.prompt) + max(len(x) for x in t.responses) == len(g.prompt) + 100
    assert t.prompt == g.prompt[t.truncated:]
    _, counts = encode_groups(tok, [_pair(rec, long_side)], system="profile",
                              max_tokens=2 * (len(g.prompt) + 100), overlong="drop")
    assert counts["dropped_overlong"] == 1 and counts["kept"] == 0


def test_groups_pack_whole_and_per_bucket():
    tok = byte_tokenizer()
    recs = [r for r in demo_records("train") if r.length_bin == "short"][::5][:12]
    pairs, _ = make_pairs(recs, {r.id: r.response[::-1] + "!" for r in recs})
    pairs += [_pair(p.record, "again " + p.rejected) for p in pairs[:4]]
    groups, _ = encode_groups(tok, pairs, system="profile", max_tokens=1024)
    packs = pack_groups(groups, 1024, seed=3)
    assert sorted(i for p in packs for g in p for i, _, _ in g.pairs) == list(range(len(pairs)))
    for p in packs:
        assert len({g.bucket for g in p}) == 1 and sum(len(g) for g in p) <= 1024
