import os
import pathlib

import pytest
import torch

# Triton kernels run on a CPU only under the interpreter, which triton reads when a kernel is
# defined: set it before any test imports polyfast.kernels. On a GPU they run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = pathlib.Path(__file__).resolve().parents[1]
# synthetic records in the layout of the released PolyAlign files (tests/data/make_polyalign_format.py)
POLYALIGN_FORMAT = ROOT / "tests" / "data" / "polyalign_format.json"


@pytest.fixture(scope="session")
def sample_dir():
    """The authors' released sample, for the few checks against their own ids and weights:
    $POLYFAST_SAMPLE, else shared/data/polyalign_sample beside the checkout (bench.train_setup.sample_dir)."""
    from polyfast.bench.train_setup import sample_dir as where

    path = pathlib.Path(where())
    if not (path / "dist_sft_val.json").is_file():
        if os.environ.get("CI"):  # CI lays shared/ beside the clone: its absence is an error there
            pytest.fail(f"the authors' sample is not at {path}")
        pytest.skip(f"checks against the authors' released sample: not found at {path}; set "
                    "POLYFAST_SAMPLE to a folder holding dist_sft_val.json and dist_sft_test.json "
                    "to run them")
    return path


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
