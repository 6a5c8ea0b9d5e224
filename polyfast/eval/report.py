"""report.md and PNG plots for one or several evaluated runs (matplotlib, no display needed)."""

from __future__ import annotations

import math

import numpy as np

from ..tables import format_table

_COLUMNS = [("f1", "F1"), ("rouge_l", "ROUGE-L"), ("exact_match", "EM"), ("distinct_2", "dist-2"),
            ("self_bleu4", "self-BLEU4"), ("bng", "BNG"), ("hcr", "HCR"), ("in_band", "in-band"),
            ("distance", "dist"), ("bin_agreement", "bin"), ("length_w1", "len W1"),
            ("tdm", "TDM"), ("c_mauve", "C-MAUVE"), ("empty", "empty")]

# the metrics a verdict reads, the direction that is better (+1 higher, -1 lower), its wording and
# what moving the better way means
HUMAN, GOLD = "toward the human side", "toward the gold answers"
VERDICTS = [("distance", -1, "band distance to the human support", HUMAN),
            ("bng", -1, "BNG (gap to the human feature distributions)", HUMAN),
            ("hcr", +1, "HCR (share inside every feature's human band)", HUMAN),
            ("in_band", +1, "in-band share per feature", HUMAN),
            ("bin_agreement", +1, "length-bin agreement", HUMAN),
            ("length_w1", -1, "W1 to the human lengths", HUMAN),
            ("tdm", -1, "TDM (multi-turn coupling gap)", HUMAN),
            ("f1", +1, "token F1 against the gold answer", GOLD)]


def _fmt(x):
    return float("nan") if x is None else x


def _finite(x) -> bool:
    return x is not None and not math.isnan(x)


def verdicts(base: dict, new: dict, tol: float = 1e-9) -> list[str]:
    """One sentence per metric: in how many buckets ``new`` moved toward the human side compared
    with ``base`` (the buckets both have a value for), by how much, and the macro change."""
    out = []
    for key, sign, label, toward in VERDICTS:
        deltas = [new["buckets"][b][key] - v[key] for b, v in base["buckets"].items()
                  if _finite(v.get(key)) and _finite(new["buckets"].get(b, {}).get(key))]
        if not deltas:
            continue
        better = sum(sign * d > tol for d in deltas)
        worse = sum(sign * d < -tol for d in deltas)
        line = (f"- {label} ({'lower' if sign < 0 else 'higher'} is better): {new['title']} moved "
                f"{better} of {len(deltas)} buckets {toward}, {worse} away, "
                f"{len(deltas) - better - worse} unchanged; median change "
                f"{float(np.median(deltas)):+.4f}")
        b0, b1 = base["macro"].get(key), new["macro"].get(key)
        if _finite(b0) and _finite(b1):
            d = sign * (b1 - b0)
            line += (f"; macro {b0:.4f} -> {b1:.4f} ({b1 - b0:+.4f}, "
                     f"{'better' if d > tol else 'worse' if d < -tol else 'unchanged'})")
        out.append(line + ".")
    return out


def _empty_notes(r: dict) -> list[str]:
    """Where generations came out empty (against the humans' empty share), and how many empty
    gold answers the utility metrics left out."""
    notes = []
    rows = sorted(((b, v) for b, v in r["buckets"].items() if v.get("empty")),
                  key=lambda x: -x[1]["empty"])
    if rows:
        notes.append(f"Empty generations in {len(rows)} of {len(r['buckets'])} buckets (most: "
                     + ", ".join(f"{b} {v['empty']:.0%}, its humans {v['human_empty']:.0%}"
                                 for b, v in rows[:3]) + ").")
    refs = sum(v.get("empty_references", 0) for v in r["buckets"].values())
    if refs:
        notes.append(f"{refs} test records with an empty gold answer are left out of EM, F1 and "
                     "ROUGE-L.")
    return notes


def comparisons(results: list[dict]) -> list[str]:
    """The verdict section: each later run against the first of the same profile."""
    lines = []
    by_profile: dict[str, list[dict]] = {}
    for r in results:
        by_profile.setdefault(r["profile"], []).append(r)
    for profile, runs in by_profile.items():
        for new in runs[1:]:
            lines += [f"## Verdict: {new['title']} vs {runs[0]['title']} (profile {profile})", ""]
            lines += verdicts(runs[0], new) or ["- no metric to compare"]
            lines.append("")
    return lines


def report_markdown(results: list[dict], sections: list[str] = ()) -> str:
    """The verdicts of each run against the first of its profile, ``sections`` (markdown the
    caller adds, such as training tables), a summary table (macro and weighted per run) and one
    per-bucket table per run."""
    lines = ["# polyfast evaluation", ""]
    lines.append("Metrics per bucket; macro = mean over buckets, weighted = by bucket size. "
                 "BNG, HCR, the in-band share and the band distance are measured against the "
                 "TRAIN human responses; lower is better for BNG, distance, length W1, TDM and "
                 "self-BLEU; empty = share of empty generations. EM, F1 and ROUGE-L leave out "
                 "records whose gold answer is empty.")
    lines.append("")
    lines += comparisons(results)
    lines += list(sections)
    rows = []
    for r in results:
        for kind in ("macro", "weighted"):
            rows.append([f"{r['title']} ({r['profile']}, {kind})"]
                        + [_fmt(r[kind].get(k)) for k, _ in _COLUMNS])
    cols = [(k, c) for k, c in _COLUMNS if any(k in r["macro"] for r in results)]
    rows = [[row[0]] + [row[1 + i] for i, kc in enumerate(_COLUMNS) if kc in cols] for row in rows]
    lines += ["## Summary", "", format_table(["run"] + [c for _, c in cols], rows), ""]
    for r in results:
        rows = [[b, v["n"]] + [_fmt(v.get(k)) for k, _ in cols] for b, v in r["buckets"].items()]
        lines += [f"## {r['title']}: profile {r['profile']}", "",
                  format_table(["bucket", "n"] + [c for _, c in cols], rows), ""]
        left = {b: v["bng_features_left_out"] for b, v in r["buckets"].items()}
        lines.append(f"BNG leaves out features constant among a bucket's humans: "
                     f"{min(left.values())}-{max(left.values())} of them per bucket.")
        lines += _empty_notes(r)
        if "c_mauve" not in r["macro"]:
            lines.append("C-MAUVE skipped: it needs `pip install polyfast[mauve]` and a local "
                         "featuriser model (`polyfast eval --featurizer DIR`).")
        lines.append("")
    return "\n".join(lines)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_lengths(result: dict, path: str) -> None:
    """Per-bucket response-length histograms, model against human."""
    plt = _pyplot()
    buckets = list(result["buckets"])
    cols = 4
    rows = math.ceil(len(buckets) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for ax, b in zip(axes.flat, buckets):
        v = result["buckets"][b]
        hi = max(v["gen_lengths"] + v["human_lengths"] + [1])
        bins = np.linspace(0, hi, 16)
        ax.hist(v["human_lengths"], bins=bins, alpha=0.6, label="human")
        ax.hist(v["gen_lengths"], bins=bins, alpha=0.6, label="model")
        ax.set_title(b, fontsize=8)
        ax.set_xlabel("response length (tokens)", fontsize=7)
        ax.set_ylabel("responses", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(buckets):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Response lengths (tokens): {result['title']}, profile {result['profile']}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_bng_hcr(results: list[dict], path: str) -> None:
    """BNG, HCR and the per-feature in-band share per bucket, one bar per run."""
    plt = _pyplot()
    buckets = sorted({b for r in results for b in r["buckets"]})
    x = np.arange(len(buckets))
    width = 0.8 / len(results)
    panels = (("bng", "BNG (lower is better)"), ("hcr", "HCR (higher is better)"),
              ("in_band", "in-band share\nper feature (higher)"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.6 * len(buckets)), 9.5), sharex=True)
    for k, (key, label) in enumerate(panels):
        ax = axes[k]
        for i, r in enumerate(results):
            vals = [r["buckets"].get(b, {}).get(key, np.nan) for b in buckets]
            ax.bar(x + i * width, vals, width, label=f"{r['title']} ({r['profile']})")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    axes[-1].set_xticks(x + width * (len(results) - 1) / 2)
    axes[-1].set_xticklabels(buckets, rotation=60, ha="right", fontsize=7)
    axes[-1].set_xlabel("bucket")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
