"""Shared pytest configuration for the kvmirqfast test suite.

``slow`` marks the long runs (minutes: the long churn, the large hypothesis profile).  They are
skipped unless ``KVMIRQFAST_LONG=1`` is set or pytest is given ``--run-slow`` (which sets it).
"""

import os


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="run the long reliability tests (same as KVMIRQFAST_LONG=1)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long run (minutes); needs KVMIRQFAST_LONG=1 or "
                                       "--run-slow")
    if config.getoption("--run-slow"):
        os.environ["KVMIRQFAST_LONG"] = "1"
