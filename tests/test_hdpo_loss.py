import math

import pytest
import torch

from polyfast.losses import hdpo_loss


def _rand(P=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda scale=1.0: torch.randn(P, generator=g, dtype=torch.float64) * scale  # noqa: E731
    return dict(policy_chosen=r(20) - 50, policy_rejected=r(20) - 60, ref_chosen=r(20) - 52,
                ref_rejected=r(20) - 58, chosen_dist=r().abs(), rejected_dist=r().abs() + 0.5,
                pair_weight=torch.rand(P, generator=g, dtype=torch.float64) * 2 + 0.5,
                chosen_tokens=torch.randint(1, 60, (P,), generator=g).double())


def _formula(a, beta, lam, ftx, eps):
    total_w = sum(a["pair_weight"].tolist())
    P = len(a["pair_weight"])
    dpo = reg = anchor = 0.0
    for i in range(P):
        pc, pr = a["policy_chosen"][i].item(), a["policy_rejected"][i].item()
        rc, rr = a["ref_chosen"][i].item(), a["ref_rejected"][i].item()
        h = (pc - pr) - (rc - rr)
        ls = lambda x: -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))  # noqa: E731
        dpo += a["pair_weight"][i].item() * (-(1 - eps) * ls(beta * h) - eps * ls(-beta * h))
        p = 1 / (1 + math.exp(-beta * (pc - pr)))
        reg += p * a["chosen_dist"][i].item() + (1 - p) * a["rejected_dist"][i].item()
        anchor += -pc / a["chosen_tokens"][i].item()
    return dpo / total_w + lam * reg / P + ftx * anchor / P


@pytest.mark.parametrize("beta,lam,ftx,eps", [(0.1, 0.1, 0.05, 0.0), (0.5, 1.0, 0.2, 0.1), (0.05, 0.0, 0.0, 0.0)])
def test_hdpo_equals_the_formula(beta, lam, ftx, eps):
    a = _rand()
    loss, m = hdpo_loss(**a, beta=beta, reg_lambda=lam, ftx=ftx, label_smoothing=eps)
    assert loss.item() == pytest.approx(_formula(a, beta, lam, ftx, eps), rel=1e-6)
    assert m["accuracy"].shape == (9,) and not m["margin"].requires_grad


def test_plain_dpo_at_zero_lambda_and_ftx_with_unit_weights():
    a = _rand(seed=1)
    a["pair_weight"] = torch.ones(9, dtype=torch.float64)
    loss, _ = hdpo_loss(**a, beta=0.1, reg_lambda=0.0, ftx=0.0)
    logits = 0.1 * ((a["policy_chosen"] - a["policy_rejected"]) - (a["ref_chosen"] - a["ref_rejected"]))
    assert loss.item() == pytest.approx((-torch.nn.functional.logsigmoid(logits)).mean().item(), rel=1e-6)


def test_step_totals_make_micro_batches_add_up():
    a = _rand(P=8, seed=2)
    full, _ = hdpo_loss(**a)
    halves = [{k: v[s] for k, v in a.items()} for s in (slice(0, 3), slice(3, 8))]
    parts = [hdpo_loss(**h, weight_sum=a["pair_weight"].sum(), num_pairs=8)[0] for h in halves]
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), rel=1e-9)


def test_gradient_only_through_the_policy():
    a = _rand(P=4, seed=3)
    a["policy_chosen"].requires_grad_()
    a["policy_rejected"].requires_grad_()
    loss, _ = hdpo_loss(**a)
    loss.backward()
    assert a["policy_chosen"].grad is not None and a["ref_chosen"].grad is None
