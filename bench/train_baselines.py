"""The authors' setup, as the end-to-end benchmark's baselines: a batch of one, SDPA, the model's
own full-vocabulary logits and loss, and for HDPO a separate reference forward every step
(``python -m polyfast.bench.train``, modes ``sft:baseline`` and ``hdpo:baseline``). Each returns
(step function -> its work, model config, device, forwards per step, info)."""

from __future__ import annotations

import torch

from .train_flops import step_work
from .train_setup import fit_examples, hdpo_config, hdpo_pairs, overrides, records, start_checkpoint


def sft_baseline(args, tmp):
    import random

    from polyfast.config import SFTConfig, load_config
    from polyfast.data import bucket_weights, byte_tokenizer, encode_records, pack_examples
    from polyfast.data.packing import to_device
    from polyfast.model import load_model, resolve_device
    from polyfast.train.optim import build_optimizer

    tok = byte_tokenizer()
    cfg = load_config(SFTConfig, None, [], extra={**overrides(args), "run_dir": tmp})
    device = resolve_device("auto")
    model = load_model(cfg.model, tok, packed=False, seed=cfg.seed, device=device)
    opt = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    recs = records(args)
    weights = bucket_weights(recs)
    exs = fit_examples(encode_records(tok, recs, weights=weights), args.max_tokens)
    random.Random(0).shuffle(exs)
    # as many examples per optimizer step as polyfast's packs hold on average
    k = max(1, round(len(exs) / len(pack_examples(exs, args.max_tokens)) * args.grad_accum))

    def step(s):
        batch = [exs[(s * k + i) % len(exs)] for i in range(k)]
        wsum = sum(e.weight for e in batch)
        for ex in batch:  # a batch of one: no packing, the model's full logits and loss
            ids = to_device(torch.tensor([ex.input_ids]), device)
            labels = ids.clone()
            labels[:, :ex.n_prompt] = -100
            with autocast:
                loss = model(input_ids=ids, labels=labels).loss
            (loss * ex.weight / wsum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return step_work([len(e) for e in batch])
    return step, model.config, device, 3, {"examples_per_step": k,
                                           "steps_per_epoch": -(-len(exs) // k)}

def hdpo_baseline(args, tmp):
    import dataclasses
    import random

    import numpy as np

    from polyfast.critic import FEATURE_NAMES, References, feature_matrix
    from polyfast.data import load_tokenizer
    from polyfast.data.groups import encode_groups, pack_groups
    from polyfast.data.packing import to_device
    from polyfast.losses import hdpo_loss
    from polyfast.model import load_model, resolve_device
    from polyfast.train.optim import build_optimizer

    start = start_checkpoint(args, tmp)
    cfg = hdpo_config(args, tmp, start)
    tok = load_tokenizer(start)
    device = resolve_device("auto")
    plain = dataclasses.replace(cfg.model, liger=False, compile=False)
    policy = load_model(plain, tok, packed=False, device=device)
    reference = load_model(dataclasses.replace(plain, activation_checkpointing=False), tok,
                           packed=False, device=device).eval().requires_grad_(False)
    opt = build_optimizer(policy, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    pairs = hdpo_pairs(args)
    groups, _ = encode_groups(tok, pairs, system=cfg.data.system_prompt, max_tokens=args.max_tokens,
                              shared=False)
    # one pair at a time: (pair index, bucket, chosen ids, rejected ids, prompt length)
    examples = [(i, g.bucket, g.prompt + g.responses[c], g.prompt + g.responses[r], len(g.prompt))
                for g in groups for i, c, r in g.pairs]
    recs = [p.record for p in pairs]
    refs = References.build(recs, feature_matrix(r.response for r in recs), FEATURE_NAMES,
                            cfg.hdpo.min_bucket_size)
    buckets = [p.bucket_id for p in pairs]
    dc = refs.distance(feature_matrix(p.chosen for p in pairs), buckets)
    dr = refs.distance(feature_matrix(p.rejected for p in pairs), buckets)
    assert np.isfinite(dc).all() and np.isfinite(dr).all()
    # per pair, on the device once: (distance chosen, distance rejected, weight, chosen tokens)
    n_chosen = np.zeros(len(pairs))
    n_chosen[[e[0] for e in examples]] = [len(e[2]) - e[4] for e in examples]
    per_pair = torch.tensor(np.stack([dc, dr, [p.weight for p in pairs], n_chosen], 1),
                            dtype=torch.float32, device=device)  # (n_pairs, 4)
    random.Random(0).shuffle(examples)
    k = max(1, round(len(examples) / len(pack_groups(groups, args.max_tokens)) * args.grad_accum))
    h = cfg.hdpo

    def logps(model, ids, mask, labels):  # full logits -> log_softmax -> gather; (2,) sums
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (2, L-1, V)
        target = labels[:, 1:]
        lp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
        return (lp * (target != -100)).sum(-1)

    def step(s):
        batch = [examples[(s * k + i) % len(examples)] for i in range(k)]
        wsum = sum(pairs[e[0]].weight for e in batch)
        lengths = []
        for index, _, *sides, n_prompt in batch:  # chosen and rejected padded into a batch of two
            L = max(len(x) for x in sides)
            ids = torch.zeros(2, L, dtype=torch.long)
            mask = torch.zeros(2, L, dtype=torch.long)
            labels = torch.full((2, L), -100)
            for row, x in enumerate(sides):
                ids[row, :len(x)] = torch.tensor(x)
                mask[row, :len(x)] = 1
                labels[row, n_prompt:len(x)] = ids[row, n_prompt:len(x)]
            ids, mask, labels = (to_device(t, device) for t in (ids, mask, labels))
            with autocast:
                pol = logps(policy, ids, mask, labels)
                with torch.no_grad():
                    ref = logps(reference, ids, mask, labels)  # a separate reference forward
            d_c, d_r, w, n_c = per_pair[index:index + 1].unbind(1)  # each (1,)
            loss, _ = hdpo_loss(pol[:1], pol[1:], ref[:1], ref[1:], d_c, d_r, w, n_c, beta=h.beta,
                                reg_lambda=h.reg_lambda, ftx=h.ftx, weight_sum=wsum, num_pairs=k)
            loss.backward()
            lengths += [len(x) for x in sides]
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        buckets = {e[1] for e in batch}
        return step_work(lengths, bucket=buckets.pop() if len(buckets) == 1 else None)
    return step, policy.config, device, 4, {"pairs_per_step": k,
                                            "steps_per_epoch": -(-len(examples) // k)}
