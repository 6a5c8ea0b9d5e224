"""polyfast's loss kernels. Each op: Triton kernels, launcher, autograd.Function, a chunked PyTorch
twin and a full-logits reference, with the backend chosen per call.

This folder is installed as ``polyfast.kernels`` and is importable under that name only. The name
``kernels`` belongs to Hugging Face's package (which transformers imports), and ``python -m ...`` run
from the repository root puts this folder's parent first on ``sys.path``; so when this file is
imported as a top-level ``kernels`` it hands the name over to the first other ``kernels`` Python can
find, or, when there is none, leaves an empty namespace package (no ``__file__``, no submodules: what
transformers' availability probe reads as "not installed"). Nothing of polyfast is ever reachable as
``kernels``.
"""

if __name__ == "kernels":  # a top-level import, from the repository root
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    def _hand_over(name: str, shadowed_root: str) -> None:
        """Put the ``name`` Python finds anywhere but under ``shadowed_root`` into sys.modules[name],
        in place of this module (an import returns what sys.modules holds once the file has run); an
        empty namespace package when there is none."""
        spec = None
        for finder in _sys.meta_path:
            if finder is _machinery.PathFinder:  # the finder that reads sys.path
                path = [p for p in _sys.path if _os.path.realpath(p or _os.curdir) != shadowed_root]
                spec = finder.find_spec(name, path)
            elif hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, None)
            if spec is not None:
                break
        del _sys.modules[name]
        if spec is None:  # an empty namespace package, what a folder without code gives
            spec = _machinery.ModuleSpec(name, None, is_package=True)
        module = _util.module_from_spec(spec)
        _sys.modules[name] = module
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            try:
                spec.loader.exec_module(module)
            except BaseException:
                _sys.modules.pop(name, None)
                raise

    _hand_over(__name__, _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__))))

else:
    from .joint_logprobs import joint_logprobs, joint_logprobs_reference, joint_logprobs_triton
    from .linear_ce import (linear_ce_gemm, linear_ce_reference, linear_ce_torch,
                            linear_ce_triton, linear_cross_entropy)

    __all__ = ["linear_cross_entropy", "linear_ce_reference", "linear_ce_torch",
               "linear_ce_triton", "linear_ce_gemm",
               "joint_logprobs", "joint_logprobs_reference", "joint_logprobs_triton"]
