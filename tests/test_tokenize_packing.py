from collections import Counter

import pytest
import torch

from polyfast.data import (byte_tokenizer, collate, demo_records, encode_record, encode_records,
                           make_record, pack_examples, packing_efficiency)
from polyfast.data.packing import example_mass
from polyfast.data.tokenize import Example, fit_length


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_byte_tokenizer_round_trip_and_save(tok, tmp_path):
    from transformers import AutoTokenizer
    text = "Tea 茶 ☕ — ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    msgs = [{"role": "user", "content": "hi"}]
    assert (again.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))


def test_labels_cover_exactly_the_response(tok):
    rec = make_record(id="r", question="Why?", response="因为 because.", history=[("a", "b")])
    ex = encode_record(tok, rec)
    assert tok.decode(ex.input_ids[ex.n_prompt:]) == rec.response + tok.eos_token
    prompt = tok.decode(ex.input_ids[:ex.n_prompt])
    assert prompt.startswith(tok.bos_token) and prompt.endswith("<|assistant|>")
    assert "family=assistant; track=multi" in prompt and "<|user|>a<|end|><|assistant|>b" in prompt
    batch = collate([ex], ["en|multi|assistant|short"])
    labels = batch.labels[0]
    assert (labels[:ex.n_prompt] == -100).all()
    assert labels[ex.n_prompt:].tolist() == list(ex.input_ids[ex.n_prompt:])
    no_sys = encode_record(tok, rec, system="none")
    assert "<|system|>" not in tok.decode(no_sys.input_ids[:no_sys.n_prompt])


def test_fit_length_truncates_prompt_from_the_left_or_drops(tok):
    ex = Example(tuple(range(10)), n_prompt=6, bucket="b")
    cut = fit_length(ex, 7)
    assert cut.input_ids == tuple(range(3, 10)) and cut.n_prompt == 3 and cut.truncated == 3
    assert fit_length(ex, 7, "drop") is None
    assert fit_length(ex, 4) is None  # the response alone does not fit with one prompt token
    assert fit_length(ex, 10) is ex


def _examples(tok, n=120):
    recs = demo_records("train")[::7][:n]
    weights = {b: 1.0 + i / 10 for i, b in enumerate(sorted({r.bucket_id for r in recs}))}
    fitted = [fit_length(e, 1024) for e in encode_records(tok, recs, weights=weights)]
    return [e for e in fitted if e is not None]


@pytest.mark.parametrize("packing", ["bucket", "mixed"])
def test_packs_keep_examples_whole_and_within_capacity(tok, packing):
    exs = _examples(tok)
    packs = pack_examples(exs, 1024, packing)
    flat = [e for p in packs for e in p]
    assert Counter(e.record_id for e in flat) == Counter(e.record_id for e in exs)
    assert all(sum(map(len, p)) <= 1024 for p in packs)
    if packing == "bucket":
        assert all(len({e.bucket for e in p}) == 1 for p in packs)
    else:
        assert any(len({e.bucket for e in p}) > 1 for p in packs)
    assert 0 < packing_efficiency(packs, 1024, packing) <= 1
    # seeded shuffles reorder packs but keep their content
    shuffled = pack_examples(exs, 1024, packing, seed=3)
    assert sorted(map(lambda p: tuple(e.record_id for e in p), shuffled)) == \
        sorted(map(lambda p: tuple(e.record_id for e in p), packs))


@pytest.mark.parametrize("weighting", ["bucket", "example", "token"])
def test_packed_batch_format(tok, weighting):
    exs = _examples(tok)
    names = sorted({e.bucket for e in exs})
    pack = pack_examples(exs, 1024, "mixed")[0]
    b = collate(pack, names, weighting=weighting)
    T = sum(map(len, pack))
    assert b.input_ids.shape == b.position_ids.shape == b.labels.shape == (1, T)
    assert b.token_weights.shape == b.bucket_ids.shape == (T,) and b.token_weights.dtype == torch.float32
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.tolist()[-1] == T
    assert b.max_seqlen == max(map(len, pack))
    for i, ex in enumerate(pack):
        s, e = b.cu_seqlens[i].item(), b.cu_seqlens[i + 1].item()
        assert b.position_ids[0, s:e].tolist() == list(range(len(ex)))
        assert b.input_ids[0, s:e].tolist() == list(ex.input_ids)
        assert b.labels[0, s] == -100  # an example never starts on a label
        assert (b.labels[0, s:s + ex.n_prompt] == -100).all()
        assert b.labels[0, s + ex.n_prompt:e].tolist() == list(ex.input_ids[ex.n_prompt:])
        assert (b.token_weights[s:s + ex.n_prompt] == 0).all()
        assert set(b.bucket_ids[s:e].tolist()) == {names.index(ex.bucket)}
        # the example's token weights add up to its mass
        mass = b.token_weights[s:e].sum().item()
        want = example_mass(ex, weighting) if weighting != "token" else ex.n_response
        assert mass == pytest.approx(want, rel=1e-5)
    assert b.mass == pytest.approx(sum(example_mass(e, weighting) for e in pack))


def test_padded_batch_format(tok):
    exs = _examples(tok)[:3]
    names = sorted({e.bucket for e in exs})
    (pack,) = pack_examples(exs, 1024, "none", batch_size=3)
    b = collate(pack, names, padded=True, pad_id=tok.pad_token_id)
    L = max(map(len, exs))
    assert b.input_ids.shape == (3, L) and b.cu_seqlens is None
    assert b.attention_mask.sum().item() == b.num_tokens == sum(map(len, exs))
    assert (b.labels[b.attention_mask == 0] == -100).all()
    assert (b.token_weights.view(3, L)[b.attention_mask == 0] == 0).all()
    flat = collate(pack, names)  # the same tokens, packed into one row
    for name in ("input_ids", "position_ids", "labels"):
        assert getattr(b, name)[b.attention_mask == 1].tolist() == getattr(flat, name)[0].tolist()
    assert b.token_weights[b.attention_mask.flatten() == 1].tolist() == flat.token_weights.tolist()
    assert (b.input_ids[b.attention_mask == 0] == tok.pad_token_id).all()
    assert packing_efficiency([pack], 1024, "none") == pytest.approx(b.num_tokens / (3 * L))


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
def test_scored_tokens_are_the_shifted_labels_of_the_layout(tok, padded):
    # what the loss head reads: each response token with the row before it (of the packed
    # stream, or of the flattened padded rows), its weight, example and bucket
    exs = _examples(tok)[:3]
    names = sorted({e.bucket for e in exs})
    (pack,) = pack_examples(exs, 1024, "none", batch_size=3)
    b = collate(pack, names, padded=padded, pad_id=tok.pad_token_id)
    sc = b.scored
    labels, ids = b.labels.reshape(-1), b.input_ids.reshape(-1)
    want = (labels != -100).nonzero()[:, 0]  # the response tokens in the layout
    assert sc.rows.tolist() == (want - 1).tolist()
    assert sc.targets.tolist() == labels[want].tolist() == ids[sc.rows + 1].tolist()
    assert sc.weights.tolist() == b.token_weights[want].tolist()
    assert sc.buckets.tolist() == b.bucket_ids[want].tolist()
    assert sc.num_segments == len(pack)
    assert sc.segments.tolist() == [i for i, ex in enumerate(pack) for _ in range(ex.n_response)]
