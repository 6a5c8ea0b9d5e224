import json

import numpy as np
import pytest

from polyfast.cli import main
from polyfast.data import demo_records
from polyfast.errors import DataError
from polyfast.eval.evaluate import align, evaluate, prior_records, write_report


@pytest.fixture(scope="module")
def data():
    return demo_records("test"), demo_records("train")


def test_alignment_errors_name_the_id(data):
    test, _ = data
    preds = {r.id: "x" for r in test}
    assert align(test, preds) == ["x"] * len(test)
    missing = dict(preds)
    del missing[test[3].id]
    with pytest.raises(DataError, match=test[3].id):
        align(test, missing, "p.jsonl")
    with pytest.raises(DataError, match="ghost-7"):
        align(test, {**preds, "ghost-7": "y"}, "p.jsonl")


def test_human_answers_score_better_than_a_constant_answer(data):
    test, train = data
    human = evaluate(test, [r.response for r in test], train)
    const = evaluate(test, ["OK."] * len(test), train)
    assert human["macro"]["f1"] == pytest.approx(1.0) and human["macro"]["exact_match"] == 1.0
    assert human["macro"]["bin_agreement"] == 1.0 and human["macro"]["length_w1"] == 0.0
    assert human["macro"]["bng"] < const["macro"]["bng"]
    assert human["macro"]["distance"] < const["macro"]["distance"]
    assert human["macro"]["hcr"] >= const["macro"]["hcr"]
    assert const["macro"]["distinct_1"] < human["macro"]["distinct_1"]
    assert const["macro"]["self_bleu4"] > human["macro"]["self_bleu4"]
    assert set(human["buckets"]) == {r.bucket_id for r in test}
    multi = [b for b, v in human["buckets"].items() if "|multi|" in b]
    tdm = [human["buckets"][b]["tdm"] for b in multi]
    # identical to the humans: 0, or undefined (nan) where a bucket's one test record has no spread
    assert multi and all(t == 0.0 or np.isnan(t) for t in tdm) and any(t == 0.0 for t in tdm)
    counts = {b: v["n"] for b, v in human["buckets"].items()}
    w = sum(const["buckets"][b]["bng"] * n for b, n in counts.items()) / sum(counts.values())
    assert const["weighted"]["bng"] == pytest.approx(w)


def test_prior_profile_draws_bins_from_the_train_prior(data):
    test, train = data
    a, b = prior_records(test, train, seed=3), prior_records(test, train, seed=3)
    assert [r.length_bin for r in a] == [r.length_bin for r in b]
    allowed = {}
    for r in train:
        allowed.setdefault(r.bucket_id.rsplit("|", 1)[0], set()).add(r.length_bin)
    assert all(r.length_bin in allowed[r.bucket_id.rsplit("|", 1)[0]] for r in a)
    assert [r.id for r in a] == [r.id for r in test]


def test_report_files_and_plots(data, tmp_path):
    test, train = data
    res = evaluate(test, [r.response[::-1] for r in test], train)
    write_report(res, str(tmp_path / "run"), "reversed", "oracle")
    for name in ("metrics.json", "report.md", "lengths.png", "bng_hcr.png"):
        assert (tmp_path / "run" / name).exists()
    for png in ("lengths.png", "bng_hcr.png"):
        raw = (tmp_path / "run" / png).read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        import matplotlib.image as mpimg
        assert mpimg.imread(tmp_path / "run" / png).shape[0] > 100
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["profile"] == "oracle" and len(metrics["buckets"]) == len({r.bucket_id for r in test})
    assert "C-MAUVE skipped" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.slow
def test_eval_command_and_compare(data, tmp_path, capsys):
    test, _ = data
    preds = tmp_path / "p.jsonl"
    preds.write_text("\n".join(json.dumps({"id": r.id, "prediction": r.response[:20]}) for r in test))
    assert main(["eval", "--predictions", str(preds), "--data", "demo:test", "--references",
                 "demo:train", "--out", str(tmp_path / "a"), "--profile", "none"]) == 0
    assert main(["eval", "--predictions", str(preds), "--data", "demo:test", "--references",
                 "demo:train", "--out", str(tmp_path / "b"), "--title", "again",
                 "--profile", "prior"]) == 0
    assert main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                 str(tmp_path / "c")]) == 0
    text = (tmp_path / "c" / "report.md").read_text()
    assert "p.jsonl (none, macro)" in text and "again (prior, macro)" in text
    assert (tmp_path / "c" / "bng_hcr.png").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "nobody", "prediction": "x"}))
    assert main(["eval", "--predictions", str(bad), "--data", "demo:test", "--references",
                 "demo:train", "--out", str(tmp_path / "d")]) == 2
    assert "no prediction for record id" in capsys.readouterr().err


def test_c_mauve_when_installed(data):
    pytest.importorskip("mauve", reason="C-MAUVE needs the optional mauve extra: "
                                        "pip install polyfast[mauve]")
    from polyfast.config import ModelConfig, TinyModelConfig
    from polyfast.data import byte_tokenizer
    from polyfast.model import load_model
    test, train = data
    tok = byte_tokenizer()
    model = load_model(ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2,
                                                        num_kv_heads=1, intermediate_size=64)), tok)
    sub = [r for r in test if r.bucket_id == "en|single|qa|short"]
    res = evaluate(sub, [r.response for r in sub], train, featurizer=(model, tok))
    assert 0 < res["macro"]["c_mauve"] <= 1
