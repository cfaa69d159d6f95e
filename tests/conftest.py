"""Test setup: GPU tests are marked and skipped, at run time, where no CUDA device is present.

Nothing here queries CUDA at import or collection time.
"""

import pytest
import torch


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if item.get_closest_marker("multi_gpu") is not None and torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
