import numpy as np
import pytest

from polyfast.critic import (FEATURE_NAMES, band_distance, text_features,
                             text_references, train_mlp_critic)
from polyfast.data import demo_records, make_pairs


def test_at_least_thirty_language_aware_features():
    assert len(FEATURE_NAMES) >= 30
    en = text_features("Hello world. Hello again!\n\n- item one\n- item 2")
    zh = text_features("你好，世界。你好！")
    assert en["n_sentences"] == 4 and en["list_items"] == 2 and en["exclamations"] == 1
    assert en["distinct_1"] == pytest.approx(len({"hello", "world", ".", "again", "!", "-", "item", "one", "2"}) / 12)
    assert zh["n_han"] == 6 and zh["n_tokens"] == 9 and zh["fullwidth_punct"] == 3
    assert zh["n_sentences"] == 2 and zh["han_ratio"] == pytest.approx(6 / 9)
    assert en["han_ratio"] == 0 and zh["uppercase_ratio"] == 0


def test_band_distance_on_hand_made_references():
    st = {"q10": [0.0, 10.0], "q90": [1.0, 20.0], "std": [2.0, 1.0]}
    # feature 0: scale max(1, 2, 1e-6) = 2; feature 1: scale max(10, 1) = 10
    assert band_distance(np.array([0.5, 15.0]), st) == 0.0
    assert band_distance(np.array([-4.0, 15.0]), st) == pytest.approx((4 / 2 + 0) / 2)
    assert band_distance(np.array([0.5, 45.0]), st) == pytest.approx((0 + 25 / 10) / 2)
    degenerate = {"q10": [3.0], "q90": [3.0], "std": [0.0]}
    assert band_distance(np.array([3.0 + 1e-6]), degenerate) == pytest.approx(1.0)


def test_references_use_train_only_and_fall_back_to_parents():
    train = demo_records("train")
    refs = text_references(train, min_bucket_size=20)
    small = "en|single|assistant|xlong"  # 10 train records
    key, _ = refs.lookup(small)
    assert key == "en|single|assistant"
    key, st = refs.lookup("en|single|qa|short")
    assert key == "en|single|qa|short" and st["count"][0] == 120
    with pytest.raises(ValueError, match="TRAIN"):
        text_references(train + demo_records("val"))
    # quantiles are the authors' sorted(x)[round((n-1)p)]
    lengths = sorted(text_features(r.response)["n_chars"] for r in train if r.bucket_id == "en|single|qa|short")
    assert st["q10"][0] == lengths[round(119 * 0.1)] and st["q90"][0] == lengths[round(119 * 0.9)]


def test_human_responses_sit_closer_to_their_band_than_mismatched_ones():
    train = demo_records("train")
    refs = text_references(train)
    longs = [r for r in demo_records("test") if r.bucket_id == "en|single|assistant|long"]
    d_ok = refs.distance(np.array([list(text_features(r.response).values()) for r in longs]),
                         [r.bucket_id for r in longs])
    d_bad = refs.distance(np.array([list(text_features("Yes.").values()) for _ in longs]),
                          [r.bucket_id for r in longs])
    assert d_bad.min() > d_ok.mean()


def test_mlp_critic_trains_saves_and_loads(tmp_path):
    train = demo_records("train")[::4]
    refs = text_references(train, min_bucket_size=5)
    pairs, _ = make_pairs(train[:60], {r.id: "ok." for r in train[:60]})
    critic, history = train_mlp_critic(train, pairs, refs, epochs=3)
    assert history[-1] < history[0]
    scores = critic.score([p.chosen for p in pairs], [p.bucket_id for p in pairs])
    rejected = critic.score([p.rejected for p in pairs], [p.bucket_id for p in pairs])
    assert (rejected > scores).mean() > 0.8
    critic.save(tmp_path / "c")
    again = type(critic).load(tmp_path / "c")
    assert np.allclose(again.score(["ok."], [pairs[0].bucket_id]), critic.score(["ok."], [pairs[0].bucket_id]))


def test_lm_features_come_from_joint_logprobs():
    import torch
    from polyfast.config import ModelConfig, TinyModelConfig
    from polyfast.critic import LM_FEATURE_NAMES, features
    from polyfast.data import byte_tokenizer, encode_record
    from polyfast.model import load_model
    tok = byte_tokenizer()
    model = load_model(ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2,
                                                        num_kv_heads=1, intermediate_size=64)), tok).eval()
    recs = demo_records("val")[:5]
    values, names = features(recs, model=model, tokenizer=tok)
    assert values.shape == (5, len(FEATURE_NAMES) + len(LM_FEATURE_NAMES)) and names[-1] == LM_FEATURE_NAMES[-1]
    # against a plain forward of the first record
    ex = encode_record(tok, recs[0])
    with torch.no_grad():
        ids = torch.tensor([ex.input_ids])
        model.set_attn_implementation("sdpa")
        lp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(1, ids[0, 1:, None])[:, 0]
    expected = lp[ex.n_prompt - 1:]
    lm = dict(zip(names, values[0]))
    assert lm["lm_logp_sum"] == pytest.approx(expected.sum().item(), rel=1e-4)
    assert lm["lm_surprisal_max"] == pytest.approx(-expected.min().item(), rel=1e-4)
    assert lm["lm_noprompt_logp_sum"] != pytest.approx(lm["lm_logp_sum"])
