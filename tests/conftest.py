import os
import pathlib

import pytest

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
    import torch
    torch.set_num_threads(min(2, os.cpu_count() or 1))
