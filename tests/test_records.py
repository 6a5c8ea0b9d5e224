import json

import pytest

from polyfast.data import bucket_weights, load_records, profile_prompt, read_records
from polyfast.errors import DataError


# --- the released PolyAlign layout: synthetic rows (always), the authors' sample (when present) ---


def _check_polyalign_file(path, tmp_path):
    """Buckets, bins, weights, profile prompts, history and prompt parts of a file in the layout
    of the released dist_sft_*.json, each checked against what the file ships."""
    raw = json.loads(path.read_text())
    records = load_records(path, legacy_tokens=True)
    assert len(records) == len(raw)
    # recompute every bucket from the response alone: strip the shipped bin and bucket id
    stripped = tmp_path / path.name
    stripped.write_text(json.dumps([{k: v for k, v in r.items() if k not in ("length_bin", "bucket_id")}
                                    for r in raw]))
    derived = load_records(stripped, legacy_tokens=True)
    assert [r.bucket_id for r in derived] == [r["bucket_id"] for r in raw]
    assert [r.length_bin for r in derived] == [r["length_bin"] for r in raw]
    # weights over one file reproduce dist_sft_weight
    w = bucket_weights(records)
    for rec, row in zip(records, raw):
        assert w[rec.bucket_id] == pytest.approx(row["dist_sft_weight"], abs=1e-6)
        assert rec.weight == row["dist_sft_weight"]
        # the profile system prompt is rebuilt from the metadata
        assert profile_prompt(rec.family, rec.track, rec.style, rec.length_bin) == row["system"]
    # history and prompt parts survive
    multi = [(rec, row) for rec, row in zip(records, raw) if row.get("history")]
    assert multi and all(rec.history == tuple(map(tuple, row["history"])) for rec, row in multi)
    assert all(rec.question == row["instruction"] and rec.context == row["input"]
               for rec, row in zip(records, raw))
    return records


def test_polyalign_layout_buckets_and_weights(tmp_path):
    from conftest import POLYALIGN_FORMAT
    records = _check_polyalign_file(POLYALIGN_FORMAT, tmp_path)
    assert len({r.bucket_id for r in records}) == 9 and len({r.length_bin for r in records}) == 4
    assert sum(not r.response for r in records) == 2  # unanswerable QA rows: empty, kept


@pytest.mark.parametrize("name", ["dist_sft_val.json", "dist_sft_test.json"])
def test_authors_sample_buckets_and_weights(sample_dir, name, tmp_path):
    assert len(_check_polyalign_file(sample_dir / name, tmp_path)) == 2000


def test_bucket_weights_power_and_clip():
    from polyfast.data import make_record
    recs = ([make_record(id=f"a{i}", response="hi", family="qa") for i in range(30)]
            + [make_record(id=f"b{i}", response="hi", family="dialogue") for i in range(10)])
    w1 = bucket_weights(recs)
    assert w1["en|single|qa|short"] == pytest.approx(40 / (2 * 30))
    assert w1["en|single|dialogue|short"] == pytest.approx(40 / (2 * 10))
    w0 = bucket_weights(recs, power=0.0)
    assert all(v == pytest.approx(1.0) for v in w0.values())
    wh = bucket_weights(recs, power=0.5)
    mean = (30 * wh["en|single|qa|short"] + 10 * wh["en|single|dialogue|short"]) / 40
    assert mean == pytest.approx(1.0)
    assert wh["en|single|dialogue|short"] / wh["en|single|qa|short"] == pytest.approx(3 ** 0.5)
    wc = bucket_weights(recs, clip=1.5)
    assert wc["en|single|dialogue|short"] == 1.5 and wc["en|single|qa|short"] == w1["en|single|qa|short"]


# --- formats ------------------------------------------------------------------------------

def _write(tmp_path, name, rows=None, text=None):
    p = tmp_path / name
    if text is not None:
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
    elif name.endswith(".jsonl"):
        p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    else:
        p.write_text(json.dumps(rows, ensure_ascii=False))
    return p


def test_polyfast_jsonl(tmp_path):
    p = _write(tmp_path, "r.jsonl", [
        {"id": "x1", "question": "怎么泡绿茶？", "response": "用八十度的水。", "family": "qa",
         "history": [["你好", "你好！"]], "style": "qa_search"},
        {"id": "x2", "question": "Hi", "response": "Hello there.", "extra_field": 3}])
    a, b = load_records(p)
    assert (a.language, a.track, a.family, a.style, a.length_bin) == ("zh", "multi", "qa", "qa_search", "short")
    assert a.bucket_id == "zh|multi|qa|short" and a.history == (("你好", "你好！"),)
    assert b.bucket_id == "en|single|assistant|short" and b.meta == {"extra_field": 3}


def test_chat_messages_jsonl(tmp_path):
    p = _write(tmp_path, "c.jsonl", [{"id": "m1", "family": "dialogue", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tea?"}, {"role": "assistant", "content": "Green, please."}]}])
    (r,) = load_records(p)
    assert r.system == "Be brief." and r.history == (("Hi", "Hello!"),)
    assert r.question == "Tea?" and r.response == "Green, please."
    assert r.bucket_id == "en|multi|dialogue|short"


def test_alpaca_json_without_metadata(tmp_path):
    p = _write(tmp_path, "a.json", [{"instruction": "Summarise", "input": "Long text", "output": "Short.",
                                     "history": [["q", "a"]]}])
    (r,) = load_records(p)
    assert r.prompt == "Summarise\nLong text" and r.track == "multi"
    # no id in the row: a hash of its content, so a sliced or reordered file keeps it
    assert len(r.id) == 12 and int(r.id, 16) >= 0
    row = json.loads(p.read_text())[0]
    other = {"instruction": "Other", "output": "Else."}
    q = _write(tmp_path, "b.json", [other, row, row])  # moved, and repeated: the repeat gets #2
    ids = [x.id for x in load_records(q)]
    assert ids[1:] == [r.id, r.id + "#2"] and ids[0] != r.id


# --- bad input ----------------------------------------------------------------------------

BAD_JSONL = [
    ("invalid JSON", b'{"response": "ok"}\n{"response": \n', 2, "invalid JSON"),
    ("missing response", b'{"response": "ok"}\n{"question": "q"}\n', 2, "no response"),
    ("wrong type", b'{"response": "ok"}\n{"response": 5}\n', 2, "must be a string"),
    ("wrong history", b'{"response": "ok", "history": "no"}\n', 1, "history"),
    ("unknown role", b'{"messages": [{"role": "bot", "content": "x"}]}\n', 1, "unknown role"),
    ("bad family", b'{"response": "ok", "family": "poetry"}\n', 1, "family"),
    ("bucket mismatch", b'{"response": "ok", "bucket_id": "en|single|qa|short"}\n', 1, "disagrees"),
    ("non-UTF-8", b'{"response": "ok"}\n{"response": "caf\xe9"}\n', 2, "UTF-8"),
    ("not an object", b'{"response": "ok"}\n[1, 2]\n', 2, "JSON object"),
    ("duplicate id", b'{"id": "a", "response": "ok"}\n{"id": "a", "response": "ok"}\n', 2, "duplicate"),
]


@pytest.mark.parametrize("kind,data,row,needle", BAD_JSONL, ids=[b[0] for b in BAD_JSONL])
def test_bad_rows_name_file_and_row(tmp_path, kind, data, row, needle):
    p = _write(tmp_path, "bad.jsonl", text=data)
    with pytest.raises(DataError) as e:
        load_records(p)
    assert e.value.path == str(p) and e.value.row == row
    assert f"{p}:{row}:" in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize("data,needle", [(b"", "empty file"), (b"  \n", "empty file"),
                                         (b'[{"output": "x"}', "invalid JSON"),
                                         (b'[{"output": "caf\xe9"}]', "UTF-8"),
                                         (b'{"a": 1}', "list of records")])
def test_bad_json_files(tmp_path, data, needle):
    p = _write(tmp_path, "bad.json", text=data)
    with pytest.raises(DataError) as e:
        load_records(p)
    assert str(p) in str(e.value) and needle in str(e.value)


def test_skip_bad_rows_counts(tmp_path):
    lines = [b'{"response": "ok 1"}', b'{"response": ', b'{"question": "q"}', b'{"response": 5}',
             b'{"response": "ok 2"}', b'{"response": "caf\xe9"}']
    p = _write(tmp_path, "mixed.jsonl", text=b"\n".join(lines))
    records, report = read_records(p, skip_bad_rows=True)
    assert [r.response for r in records] == ["ok 1", "ok 2"]
    assert report.rows == 6 and report.kept == 2 and sum(report.skipped.values()) == 4
    assert any(":3:" in e for e in report.first_errors)


def test_empty_responses_are_kept_and_counted(tmp_path):
    p = _write(tmp_path, "e.jsonl", text=b'{"response": "ok"}\n{"response": ""}\n')
    records, report = read_records(p)
    assert len(records) == 2 and report.empty_responses == 1 and "1 empty responses" in report.summary()


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "nope.jsonl")
