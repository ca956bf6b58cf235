import zlib

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "large: the required 12288x12288 case (about 4 GB peak memory for the float64 reference, "
        "about 10 s on 2 cores). Runs by default; deselect with -m 'not large' only for quick local loops.",
    )


def pytest_report_header(config):
    if torch.cuda.is_available():
        return f"i2am_fast tests: CUDA available ({torch.cuda.get_device_name()}): CUDA cases run"
    return "i2am_fast tests: CUDA not available: CUDA cases will be reported as skipped"


@pytest.fixture
def rng(request):
    """A CPU generator seeded from the test's id: fresh, reproducible inputs per test."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
