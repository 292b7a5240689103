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

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The norms and softmax use no tl.dot, so the interpreter runs bfloat16 too.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


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
