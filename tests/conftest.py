"""Test set-up: the Triton interpreter on machines without an NVIDIA GPU, the device and dtype grids."""

import os

# Must be set before anything imports triton. Without a GPU, Triton kernels run on CPU tensors through the
# interpreter; TRITON_INTERPRET=0 in the environment forces compiled kernels on a GPU machine.
os.environ.setdefault("TRITON_INTERPRET", "0" if os.path.exists("/dev/nvidiactl") else "1")
# On a GPU the attention kernels would autotune every one of the hundreds of variants the tests launch; the tests
# take each table's first configuration instead (tests/kernels/test_attention_launch.py covers the autotuner).
os.environ.setdefault("LMRT_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from lmrt import backends  # noqa: E402
from tests.triton_interpreter import round_bfloat16_to_nearest_even  # noqa: E402

if backends.triton_interpreter_enabled():
    round_bfloat16_to_nearest_even()

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The norms and softmax use no tl.dot, so the interpreter runs bfloat16 too.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The row-wise ops' odd many-row case: several rows per program and a shorter last program on either device. The
# interpreter takes 5x as long at 1823 rows as at 523 (35 s a bfloat16 LayerNorm case on 2 EPYC cores).
MANY_ROWS = 1823 if DEVICE == "cuda" else 523


def _backend_params() -> list:
    """Every backend that runs DEVICE's tensors, the reference last; one this process lacks is skipped, saying why
    (tests/test_backends.py checks that the extension's are built wherever a compiler is)."""
    names = [name for name in backends.BACKENDS if name != ("cpp" if DEVICE == "cuda" else "cuda")]
    return [pytest.param(name, marks=pytest.mark.skip(reason=f"backend {name}: {why}"))
            if (why := backends.unavailable_reason(name, DEVICE)) else name for name in names]


# The backends an op test runs on: triton, cpp (CPU) or cuda (GPU), torch.
BACKENDS = _backend_params()
# The backends of the extension lmrt._C, whose attention has no dropout, packed sequences or mask gradient.
EXTENSION_BACKENDS = ("cpp", "cuda")
# A test of the C++ CPU kernels themselves (streaming stores, bfloat16 rounding), skipped where they are not built.
needs_cpp = pytest.mark.skipif(bool(backends.unavailable_reason("cpp", "cpu")),
                               reason=f"backend cpp: {backends.unavailable_reason('cpp', 'cpu')}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
