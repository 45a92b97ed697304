import os
import random
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton kernels run under the interpreter; it must be chosen before
# thunderkv.triton_kernels is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Fresh random inputs every run, reproducible on demand: THUNDERKV_TEST_SEED=<n> pytest ...
BASE_SEED = int(os.environ.get("THUNDERKV_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    return f"thunderkv test seed: THUNDERKV_TEST_SEED={BASE_SEED}"


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator per test, seeded from the run's seed and the test's id."""
    g = torch.Generator()
    g.manual_seed(BASE_SEED ^ zlib.crc32(request.node.nodeid.encode()))
    return g


@pytest.fixture
def np_rng(request):
    """A numpy generator per test, seeded like :func:`gen` (reproducible with the run's seed)."""
    import numpy as np

    return np.random.default_rng(BASE_SEED ^ zlib.crc32(request.node.nodeid.encode()))


def _cpu_variants() -> list[str]:
    from thunderkv._extension import load_extension

    ext = load_extension()
    return list(ext.cpu_variants()) if ext is not None else []


@pytest.fixture(params=_cpu_variants())
def cpu_variant(request):
    """Runs the test once per CPU SIMD variant usable on this machine, restoring the default."""
    from thunderkv._extension import load_extension

    ext = load_extension()
    before = ext.cpu_variant()
    ext.set_cpu_variant(request.param)
    yield request.param
    ext.set_cpu_variant(before)
