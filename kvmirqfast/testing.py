"""Helpers for tests that run on any backend (the model delivers asynchronously, KVM at once)."""

import time


def wait_for(predicate, timeout=5.0, interval=0.0005):
    """Poll ``predicate()`` until it is truthy or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_pending(vcpu, vectors, timeout=5.0):
    """Wait until every vector in ``vectors`` is pending in ``vcpu``'s IRR; return the IRR."""
    want = set(vectors)
    wait_for(lambda: want <= set(vcpu.pending()), timeout)
    return vcpu.pending()


def settle(seconds=0.05):
    """Give an asynchronous backend time to deliver something that must NOT arrive."""
    time.sleep(seconds)
