"""lmrt: a kernel-optimized Transformer runtime for PyTorch.

    import lmrt
    y = lmrt.ops.layer_norm(x, (x.shape[-1],), weight, bias)   # same call as F.layer_norm
    with lmrt.backend("torch"):                                 # pick an implementation explicitly
        ...
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


class _SourceTreeKernelsFinder(importlib.abc.MetaPathFinder):
    """Finds `lmrt.kernels` in the top-level kernels/ folder of a source checkout.

    An installed wheel holds lmrt/kernels/ itself (setup.py maps it there); running from the repository root,
    `lmrt` is the lmrt/ folder and the kernels sit beside it.
    """

    def __init__(self, kernels_dir: Path):
        self.kernels_dir = kernels_dir

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "lmrt.kernels":
            return None
        return importlib.util.spec_from_file_location(
            fullname, self.kernels_dir / "__init__.py", submodule_search_locations=[str(self.kernels_dir)]
        )


_package_dir = Path(__file__).resolve().parent
if not (_package_dir / "kernels").is_dir() and (_package_dir.parent / "kernels" / "__init__.py").is_file():
    sys.meta_path.append(_SourceTreeKernelsFinder(_package_dir.parent / "kernels"))

from lmrt import generation, models, nn, ops, reference  # noqa: E402  (the finder must come before any kernels import)
from lmrt.backends import available_backends, backend  # noqa: E402
from lmrt.integrations import hf as _hf  # noqa: E402
from lmrt.patching import PatchReport, patch, unpatch  # noqa: E402

# attn_implementation="lmrt" in Hugging Face transformers, whether transformers is imported before lmrt or after.
_hf.install_registration_hook()

__all__ = ["PatchReport", "__version__", "available_backends", "backend", "generation", "integrations", "models", "nn",
           "ops", "patch", "reference", "unpatch"]
