"""Writes tests/data/dcp/torch-<version>/: a small DCP checkpoint as polyfast saves one (model and
AdamW state from get_state_dict, one process), to check that the installed torch's .metadata still
decodes with polyfast's reader. Deterministic values; run once under each torch to be covered:

    python tests/data/make_dcp_fixture.py
"""

import os
import sys
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict


def model_and_optimizer():
    """The fixture's model after one AdamW step, with values that do not depend on an RNG."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) / 10 - i)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9), weight_decay=0.05)
    model(torch.linspace(-1, 1, 6).reshape(2, 3)).square().sum().backward()
    opt.step()
    return model, opt


def main() -> None:
    version = torch.__version__.split("+")[0]
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dcp", f"torch-{version}")
    model, opt = model_and_optimizer()
    model_sd, optim_sd = get_state_dict(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=out, no_dist=True)
    print(out, sorted(os.listdir(out)), file=sys.stderr)


if __name__ == "__main__":
    main()
