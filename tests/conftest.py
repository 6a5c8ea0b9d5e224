import os
import pathlib

import pytest
import torch

# Triton kernels run on a CPU only under the interpreter, which triton reads when a kernel is
# defined: set it before any test imports polyfast.kernels. On a GPU they run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "polyalign_sample"


@pytest.fixture(scope="session")
def sample_dir():
    if not SAMPLE.is_dir():
        if os.environ.get("CI"):  # CI lays shared/ beside the clone: its absence is an error there
            pytest.fail(f"the authors' sample is not at {SAMPLE}")
        pytest.skip(f"the authors' sample is not at {SAMPLE}")
    return SAMPLE


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
