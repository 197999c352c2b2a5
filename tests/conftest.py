import os

import torch

# Triton decides between compiling and interpreting when a kernel is defined, so this must run
# before any test imports mlla_kernels.triton: without a GPU, kernels run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def reference_dir():
    path = os.path.abspath(os.environ.get("MLLA_REFERENCE_DIR", REFERENCE_DIR))
    if not os.path.isdir(path):
        pytest.fail(f"golden data not found at {path}: ../shared/reference must sit beside the checkout "
                    f"(or set MLLA_REFERENCE_DIR)")
    return path
