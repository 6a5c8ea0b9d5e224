from collections import Counter

from polyfast.data import demo_records, token_count, length_bin
from polyfast.data.text import FAMILIES, LENGTH_BINS


def test_demo_is_deterministic():
    a, b = demo_records("all"), demo_records("all")
    assert [r.to_json() for r in a] == [r.to_json() for r in b]


def test_demo_coverage_and_imbalance():
    train = demo_records("train")
    counts = Counter(r.bucket_id for r in train)
    assert len(counts) >= 16
    assert max(counts.values()) >= 10 * min(counts.values())
    assert {r.language for r in train} == {"en", "zh"}
    assert {r.track for r in train} == {"single", "multi"}
    assert {r.family for r in train} == set(FAMILIES)
    assert {r.length_bin for r in train} == set(LENGTH_BINS)
    for r in train:  # the bin matches the response, and multi-turn means history
        assert r.length_bin == length_bin(token_count(r.response))
        assert (r.track == "multi") == bool(r.history)


def test_demo_splits_are_disjoint_and_cover_every_bucket():
    splits = {s: demo_records(s) for s in ("train", "val", "test")}
    ids = [set(r.id for r in recs) for recs in splits.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    buckets = {s: {r.bucket_id for r in recs} for s, recs in splits.items()}
    assert buckets["train"] == buckets["val"] == buckets["test"]
    assert sum(map(len, splits.values())) == len(demo_records("all"))
