"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only``.

Not collected by the default test run (``testpaths = ["tests"]``).  Wall times here are
pytest-benchmark's; the consumer CPU per delivery and other same-run figures are in each
benchmark's ``extra_info`` (``--benchmark-json FILE`` keeps them).  For the table of ratios
against targets, run ``kvmirqfast bench``.
"""
import pytest

from kvmirqfast.bench import c_library, kvm_usable


@pytest.fixture(scope="session")
def clib():
    lib, reason = c_library()
    if lib is None:
        pytest.skip(reason)
    return lib


@pytest.fixture(scope="session")
def clib_or_none():
    return c_library()[0]


@pytest.fixture(scope="session")
def real_kvm():
    ok, reason = kvm_usable()
    if not ok:
        pytest.skip(reason)
