"""polyfast owns no import name of a dependency: kernels/ is importable as polyfast.kernels only,
and ``python -m ...`` from the repository root (which puts the root first on sys.path) leaves the
name ``kernels`` to Hugging Face's package, which transformers imports. The documented commands run
from the root and from elsewhere."""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, cwd: str, *flags: str, env: dict | None = None):
    return subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code)], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_transformers_hub_kernels_and_polyfast_kernels_share_a_process_at_the_root():
    proc = _python(f"""
        import importlib.metadata, os, sys
        assert os.path.realpath(sys.path[0] or ".") == {ROOT!r}  # the root comes first
        import transformers.integrations.hub_kernels  # imports Hugging Face's kernels
        import polyfast.kernels as ours
        import kernels
        assert callable(ours.linear_cross_entropy) and callable(ours.joint_logprobs)
        try:
            importlib.metadata.version("kernels")
            installed = True
        except importlib.metadata.PackageNotFoundError:
            installed = False
        if installed:  # Hugging Face's package, whole
            kernels.CUDAProperties
            ours_file = os.path.join({ROOT!r}, "kernels", "__init__.py")
            assert os.path.realpath(kernels.__file__) != ours_file, kernels.__file__
        else:  # an empty namespace: what transformers reads as "not installed"
            assert getattr(kernels, "__file__", None) is None and list(kernels.__path__) == []
        assert not [m for m in sys.modules if m == "kernels.linear_ce" or
                    m == "kernels.joint_logprobs"]
        print("installed" if installed else "absent")
        """, ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_without_another_kernels_the_name_holds_nothing_of_polyfast():
    # -S: no site-packages, so no Hugging Face kernels; the root is still first on sys.path
    proc = _python("""
        import kernels
        assert getattr(kernels, "__file__", None) is None, kernels.__file__
        assert not hasattr(kernels, "linear_cross_entropy")
        try:
            import kernels.linear_ce
        except ModuleNotFoundError as e:
            print("refused:", e)
        else:
            raise AssertionError("kernels.linear_ce was importable")
        """, ROOT, "-S")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: No module named 'kernels.linear_ce'" in proc.stdout


def test_the_name_goes_to_the_next_kernels_on_the_path(tmp_path):
    other = tmp_path / "kernels"
    other.mkdir()
    (other / "__init__.py").write_text("WHO = 'the other kernels'\n")
    (other / "sub.py").write_text("X = 1\n")
    proc = _python("""
        import kernels, kernels.sub
        print(kernels.WHO, kernels.sub.X)
        """, ROOT, env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "the other kernels 1"


@pytest.mark.slow
def test_documented_commands_run_from_the_root_and_from_elsewhere(tmp_path):
    shape = ["--shapes", "1024x64x1000"]
    for cwd, module in ((ROOT, "bench.roofline"), (ROOT, "polyfast.bench.roofline"),
                        (str(tmp_path), "polyfast.bench.roofline")):
        proc = subprocess.run([sys.executable, "-m", module, *shape], cwd=cwd,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (cwd, module, proc.stderr[-3000:])
        assert "roofline: " in proc.stdout.splitlines()[-1], proc.stdout[-500:]
    for cwd in (ROOT, str(tmp_path)):
        proc = subprocess.run([sys.executable, "-m", "polyfast", "config", "show", "sft"],
                              cwd=cwd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "run_dir:" in proc.stdout, proc.stderr[-3000:]
