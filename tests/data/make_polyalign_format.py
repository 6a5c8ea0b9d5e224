"""Writes polyalign_format.json: synthetic records in the layout of the released PolyAlign SFT
files (LLaMA-Factory alpaca rows with bucket metadata and ``dist_sft_weight``), for tests of that
format that must run without the released data. Every text is generated here; run it again to
rebuild the file (it is deterministic):

    python tests/data/make_polyalign_format.py
"""

import json
import os
import random
import re

PREFIX = "You are a helpful assistant. Follow the target response profile when answering."
# (family, track, style, length bin, records); the legacy token count decides the bin
PLAN = [("qa", "single", "qa_search", "short", 9), ("qa", "single", "longform_qa", "medium", 6),
        ("qa", "single", "longform_qa", "long", 3), ("qa", "multi", "qa_search", "short", 5),
        ("assistant", "single", "assistant_like", "short", 6),
        ("assistant", "single", "assistant_like", "medium", 4),
        ("assistant", "single", "assistant_like", "xlong", 2),
        ("dialogue", "multi", "open_chat", "short", 6),
        ("dialogue", "multi", "task_dialogue", "medium", 3)]
BINS = {"short": (3, 40), "medium": (41, 120), "long": (121, 240), "xlong": (241, 320)}
WORDS = ("river lantern quiet market orchard signal copper meadow harbor pencil window garden "
         "thunder ladder violet canyon marble engine saddle bridge planet kettle feather").split()
EMPTY_QA = 2  # unanswerable QA rows carry an empty output, as in the released data


def legacy_tokens(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


def sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return " ".join(words).capitalize() + "."


def text_of(rng: random.Random, lo: int, hi: int) -> str:
    """Sentences until the legacy token count lands in [lo, hi]."""
    target = rng.randint(lo, hi)
    out = []
    while legacy_tokens(" ".join(out)) < target:
        left = target - legacy_tokens(" ".join(out))
        out.append(sentence(rng, max(1, min(left - 1, rng.randint(4, 11)))))
    return " ".join(out)


def main() -> None:
    rng = random.Random(20260)
    rows = []
    for family, track, style, length, n in PLAN:
        for i in range(n):
            empty = family == "qa" and track == "single" and length == "short" and i < EMPTY_QA
            row = {"instruction": f"{sentence(rng, 6)[:-1]}?",
                   "input": text_of(rng, 20, 60) if family == "qa" else "",
                   "output": "" if empty else text_of(rng, *BINS[length]),
                   "system": f"{PREFIX} family={family}; track={track}; style={style}; "
                             f"length={length}.",
                   "bucket_id": f"en|{track}|{family}|{length}", "length_bin": length,
                   "family": family, "track": track, "style_bucket": style}
            if track == "multi" and i % 3:  # some multi-turn rows keep earlier turns in input
                row["history"] = [[sentence(rng, 5), text_of(rng, 5, 20)] for _ in range(2)]
            rows.append(row)
    counts = {}
    for r in rows:
        counts[r["bucket_id"]] = counts.get(r["bucket_id"], 0) + 1
    for r in rows:  # w_b = N / (K n_b) over this file, rounded as the released files are
        r["dist_sft_weight"] = round(len(rows) / (len(counts) * counts[r["bucket_id"]]), 8)
    rng.shuffle(rows)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "polyalign_format.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rows, f, ensure_ascii=False, indent=1)
    print(f"{len(rows)} rows in {len(counts)} buckets -> {path}")


if __name__ == "__main__":
    main()
