import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

from glm4 import kernels  # noqa: E402


@pytest.fixture(params=["amx", "vector"])
def kernel_path(request):
    """Run the test with the CPU kernels' AMX paths (bf16 products, int4 rows), then with their
    vector paths (the AMX run is skipped where the CPU has no AMX tiles or no kernels are built)."""
    previous = kernels.set_amx()
    if request.param == "amx" and not kernels.set_amx(True):
        pytest.skip("no AMX tiles here")
    if request.param == "vector":
        kernels.set_amx(False)
    yield request.param
    kernels.set_amx(previous)
