"""report.md and PNG plots for one or several evaluated runs (matplotlib, no display needed)."""

from __future__ import annotations

import math

import numpy as np

from ..train.metrics import format_table

_COLUMNS = [("f1", "F1"), ("rouge_l", "ROUGE-L"), ("exact_match", "EM"), ("distinct_2", "dist-2"),
            ("self_bleu4", "self-BLEU4"), ("bng", "BNG"), ("hcr", "HCR"), ("distance", "dist"),
            ("bin_agreement", "bin"), ("length_w1", "len W1"), ("tdm", "TDM"), ("c_mauve", "C-MAUVE")]


def _fmt(x):
    return float("nan") if x is None else x


def report_markdown(results: list[dict]) -> str:
    """A summary table (macro and weighted per run) and one per-bucket table per run."""
    lines = ["# polyfast evaluation", ""]
    lines.append("Metrics per bucket; macro = mean over buckets, weighted = by bucket size. "
                 "BNG, HCR and the band distance are measured against the TRAIN human responses; "
                 "lower is better for BNG, distance, length W1, TDM and self-BLEU.")
    lines.append("")
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
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(buckets):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Response lengths (tokens): {result['title']}, profile {result['profile']}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_bng_hcr(results: list[dict], path: str) -> None:
    """BNG and HCR per bucket, one bar per run."""
    plt = _pyplot()
    buckets = sorted({b for r in results for b in r["buckets"]})
    x = np.arange(len(buckets))
    width = 0.8 / len(results)
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.6 * len(buckets)), 7), sharex=True)
    for k, (key, label) in enumerate((("bng", "BNG (lower is better)"), ("hcr", "HCR (higher is better)"))):
        ax = axes[k]
        for i, r in enumerate(results):
            vals = [r["buckets"].get(b, {}).get(key, np.nan) for b in buckets]
            ax.bar(x + i * width, vals, width, label=f"{r['title']} ({r['profile']})")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    axes[1].set_xticks(x + width * (len(results) - 1) / 2)
    axes[1].set_xticklabels(buckets, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
