import json

import pytest

from polyfast.data import make_record
from polyfast.data.pairs import load_pairs, make_pairs, pair_weights, save_pairs
from polyfast.errors import DataError


def _rec(i, response="Human answer.", family="qa", lang_text=""):
    return make_record(id=f"r{i}", question=f"q{i}{lang_text}", response=response, family=family)


def test_drop_rules_are_counted():
    recs = [_rec(0), _rec(1), _rec(2, response=""), _rec(3), _rec(4)]
    preds = {"r0": "A model answer.", "r2": "something", "r3": "  ", "r4": "Human answer. "}
    pairs, counts = make_pairs(recs, preds)
    assert [p.id for p in pairs] == ["r0"] and pairs[0].chosen == "Human answer."
    assert pairs[0].rejected == "A model answer." and pairs[0].bucket_id == recs[0].bucket_id
    assert counts == {"kept": 1, "dropped_no_prediction": 1, "dropped_empty_chosen": 1,
                      "dropped_empty_rejected": 1, "dropped_equal": 1}


def test_round_trip_and_authors_format(tmp_path):
    pairs, _ = make_pairs([_rec(0), _rec(1)], {"r0": "x", "r1": "y"})
    path = tmp_path / "p.jsonl"
    save_pairs(pairs, path)
    assert [p.to_json() for p in load_pairs(path)] == [p.to_json() for p in pairs]
    authors = [{"instruction": "Who?", "input": "A story.", "chosen": "Dave", "rejected": "Dave Dyer was there.",
                "system": "You are a helpful assistant. Follow the target response profile when answering. "
                          "family=qa; track=multi; style=qa_search; length=short.",
                "history": [["Where?", "The lake"]], "hdpo_weight": 1.75, "chosen_dist_score": 0.0,
                "rejected_dist_score": 0.42, "critic_bucket_id": "en|multi|qa|short",
                "bucket_id": "en|multi|qa|short", "length_bin": "short", "family": "qa", "track": "multi",
                "style_bucket": "qa_search"}]
    ap = tmp_path / "hdpo.json"
    ap.write_text(json.dumps(authors))
    (p,) = load_pairs(ap)
    assert (p.chosen, p.rejected, p.weight, p.chosen_dist, p.rejected_dist) == \
        ("Dave", "Dave Dyer was there.", 1.75, 0.0, 0.42)
    assert p.record.history == (("Where?", "The lake"),) and p.record.style == "qa_search"
    assert p.bucket_id == "en|multi|qa|short" and p.meta["critic_bucket_id"] == "en|multi|qa|short"


def test_bad_pairs_name_the_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": "a"}\n')
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert e.value.row == 2 and "rejected" in str(e.value)


def test_pair_weights_formula():
    recs = [_rec(i) for i in range(6)] + [_rec(10 + i, family="dialogue") for i in range(2)]
    recs.append(make_record(id="z", question="为什么？", response="因为。"))
    pairs, _ = make_pairs(recs, {r.id: "model says" for r in recs})
    pairs = [p if p.id != "r10" else type(p)(p.record, p.rejected, chosen_dist=0.1, rejected_dist=0.9)
             for p in pairs]
    weighted = {p.id: p.weight for p in pair_weights(pairs)}
    # buckets: qa 6, dialogue 2, zh 1 -> N=9, K=3: r = 9/(3n) - 1 = -0.5 -> 0, 0.5, 2.0
    # languages: en 8, zh 1 -> r = 9/(2n) - 1 = 0 (en), 3.5 (zh)
    assert weighted["r0"] == pytest.approx(1 + 0 + 0 + 0 + 0.25)
    assert weighted["r11"] == pytest.approx(1 + 0.5 * 0.25 + 0.25)
    assert weighted["r10"] == pytest.approx(1 + 0.5 * 0.25 + 0.8 + 0.25)
    assert weighted["z"] == pytest.approx(min(3.0, 1 + 0.5 + 0.25 + 0.25))


def test_several_samples_per_record_give_one_pair_each(tmp_path):
    from polyfast.eval.generate import load_predictions, load_samples
    recs = [_rec(0), _rec(1)]
    preds = {"r0": ["One try.", "Another try.", "One try. ", "Human answer."], "r1": "Single."}
    pairs, counts = make_pairs(recs, preds)
    assert [(p.id, p.rejected) for p in pairs] == [("r0", "One try."), ("r0", "Another try."),
                                                    ("r1", "Single.")]
    assert counts == {"kept": 3, "dropped_duplicate_sample": 1, "dropped_equal": 1}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "r0", "prediction": "a", "predictions": ["a", "b"]}) + "\n"
                    + json.dumps({"id": "r1", "prediction": "c"}) + "\n")
    assert load_samples(str(path)) == {"r0": ["a", "b"], "r1": ["c"]}
    assert load_predictions(str(path)) == {"r0": "a", "r1": "c"}
    path.write_text(json.dumps({"id": "r0", "prediction": "a", "predictions": ["a", 3]}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:1: 'predictions' must be a non-empty list"):
        load_samples(str(path))


def test_a_pairs_file_may_hold_several_pairs_of_a_record_but_not_the_same_pair_twice(tmp_path):
    path = tmp_path / "pairs.jsonl"
    row = {"id": "a", "question": "q?", "chosen": "Human.", "rejected": "One."}
    path.write_text("\n".join(json.dumps(r) for r in (row, {**row, "rejected": "Two."}, row)))
    with pytest.raises(DataError, match=r"pairs.jsonl:3: duplicate pair .* 'a' \(first at row 1\)"):
        load_pairs(path)
    path.write_text("\n".join(json.dumps(r) for r in (row, {**row, "rejected": "Two."})))
    assert [p.rejected for p in load_pairs(path)] == ["One.", "Two."]
