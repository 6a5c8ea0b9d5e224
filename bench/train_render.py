"""Rendering of the end-to-end benchmark's rows: one markdown table per run (each mode's fastest
round, tokens/s against the baseline of its kind) and HDPO's per-bucket table."""

from __future__ import annotations

from polyfast.tables import markdown_table


def best_rounds(rows: list[dict]) -> list[dict]:
    """One row per mode: its fastest round (``--repeat``), with every round's tokens/s, and per
    bucket the fastest round's time."""
    by_mode: dict[tuple, list[dict]] = {}
    for r in rows:
        by_mode.setdefault((r["mode"], r["impl"]), []).append(r)
    out = []
    for runs in by_mode.values():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            out.append(runs[-1])
            continue
        best = dict(max(ok, key=lambda r: r["tokens_per_s"]))
        best["rounds_tokens_per_s"] = [r["tokens_per_s"] for r in ok]
        buckets = {}
        for r in ok:
            for b, v in r.get("buckets", {}).items():
                if b not in buckets or v["tokens_per_s"] > buckets[b]["tokens_per_s"]:
                    buckets[b] = v
        best["buckets"] = dict(sorted(buckets.items()))
        out.append(best)
    return out

def render(rows: list[dict]) -> str:
    """The markdown table of one run's rows (tokens/s relative to the baseline of the same mode;
    the fastest of a mode's rounds)."""
    if not rows:
        return "train: no rows"
    rounds = max(r.get("attempt", 0) for r in rows) + 1
    rows = best_rounds(rows)
    info = rows[0]
    tps = {(r["mode"], r["impl"]): r["tokens_per_s"] for r in rows if "tokens_per_s" in r}
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["mode"], r["impl"], None, None, None, None, None, None, None,
                          f"failed: {r['error']}"])
            continue
        base = tps.get((r["mode"], "baseline"))
        table.append([r["mode"], r["impl"], r["steps"], r["tokens"],
                      r.get("computed_tokens", r["tokens"]), r["tokens_per_s"],
                      r["step_ms"], r["peak_mb"],
                      f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a",
                      r["tokens_per_s"] / base if base else None])
    # the switches every row ran with (a mode's own options are in its impl: polyfast+liger)
    flags = [f for f in ("activation_checkpointing", "liger", "compile")
             if all(r.get(f) for r in rows)]
    data = "the demo data"
    if info.get("data") == "sample":
        data = "the authors' sample" + "".join(
            [f", a random {info['limit']} records" if info.get("limit") else "",
             f", at most {info['per_bucket']} per bucket" if info.get("per_bucket") else ""])
    best = f", the fastest of {rounds} rounds" if rounds > 1 else ""
    out = (f"End-to-end training, model {info['model']} on {data}, packs of {info['max_tokens']} tokens, "
           f"grad_accum {info['grad_accum']}{', ' + ', '.join(flags) if flags else ''}{best}; "
           f"{info['device']}, torch {info['torch']}, {info['date']}\n\n")
    out += markdown_table(["mode", "impl", "steps", "tokens", "computed", "tokens/s", "step ms",
                           "peak MB", "MFU", "vs baseline"], table)
    if any(r.get("mode") == "hdpo" for r in rows):
        out += ("\n\nHDPO tokens are pair tokens, the prompt counted once per side; 'computed' is "
                "what the mode ran through the model.")
    sft = tps.get(("sft", "polyfast"))
    ratios = [f"{impl} {t / sft:.2f}" for (kind, impl), t in tps.items()
              if sft and kind == "hdpo" and impl != "baseline"]
    if ratios:
        out += f"\n\nHDPO / SFT tokens/s (sft:polyfast): {', '.join(ratios)}"
    shared, unshared = tps.get(("hdpo", "polyfast")), tps.get(("hdpo", "unshared"))
    if shared and unshared:
        flops = {r["impl"]: r.get("flops") for r in rows if r.get("mode") == "hdpo"}
        bound = (f" (model FLOPs unshared / shared: {flops['unshared'] / flops['polyfast']:.2f})"
                 if flops.get("unshared") and flops.get("polyfast") else "")
        out += (f"\n\nPrefix sharing, HDPO pair tokens/s shared / unshared: "
                f"{shared / unshared:.2f}{bound}")
        out += "\n\n" + bucket_table(rows)
    return out

def bucket_table(rows: list[dict]) -> str:
    """HDPO pair tokens/s per bucket for each mode, the gain of prefix sharing, and what it could
    be: each bucket's prompt share of its pair tokens and the unshared / shared model FLOPs."""
    hdpo = {r["impl"]: r for r in rows if r.get("mode") == "hdpo" and "error" not in r}
    impls = [i for i in ("polyfast", "unshared", "baseline") if i in hdpo]
    buckets = sorted({b for r in hdpo.values() for b in r.get("buckets", {})})
    table = []
    for b in buckets:
        got = {i: hdpo[i]["buckets"].get(b, {}) for i in impls}
        tps = {i: got[i].get("tokens_per_s") for i in impls}
        shared, unshared = got.get("polyfast", {}), got.get("unshared", {})
        gain = (tps["polyfast"] / tps["unshared"]
                if tps.get("polyfast") and tps.get("unshared") else None)
        bound = (unshared["flops"] / shared["flops"]
                 if shared.get("flops") and unshared.get("flops") else None)
        share = hdpo["polyfast"].get("prompt_share", {}).get(b)
        table.append([b, share, bound, *(tps[i] for i in impls), gain])
    return markdown_table(["bucket", "prompt share", "FLOPs unshared / shared",
                           *(f"{i} tokens/s" for i in impls), "shared / unshared"], table)
