"""Flood: time to deliver a fixed number of interrupts, per consumer and K.

The timed part is only "start the producer, wait until N deliveries"; building the consumer and
tearing down the previous round happen in ``setup``.  ``extra_info`` has the consumer's CPU ns
per delivered interrupt (thread CPU time / delivered), deliveries/s and the average batch.
"""
import os
import time

import pytest

from kvmirqfast.bench import _close_all, _eventfds, _make_consumer, _Producer

DELIVERIES = 200_000
CONSUMERS = ["kvmirqfast", "pure Python", "asyncio", "naive C"]


class _Round:
    def __init__(self):
        self.live = None

    def cleanup(self):
        if self.live is not None:
            prod, cons, fds = self.live
            prod.close()
            cons.close()
            _close_all(fds)
            self.live = None


@pytest.fixture
def rounds():
    r = _Round()
    yield r
    r.cleanup()


@pytest.mark.parametrize("k", [16, 1024])
@pytest.mark.parametrize("consumer", CONSUMERS)
def test_flood(benchmark, rounds, clib_or_none, consumer, k):
    if consumer == "naive C" and clib_or_none is None:
        pytest.skip("no C compiler")
    lib = clib_or_none
    windows = []

    def setup():
        rounds.cleanup()
        fds = _eventfds(k)
        cons = _make_consumer(consumer, fds, lib)
        cons.start()
        prod = _Producer(fds, lib)
        rounds.live = (prod, cons, fds)
        return (prod, cons), {}

    def flood(prod, cons):
        s0 = cons.snap()
        prod.start()
        while cons.snap()[1] - s0[1] < DELIVERIES:
            time.sleep(0.001)
        s1 = cons.snap()
        prod.stop.value = 1                 # joined by the next setup / the fixture
        prod._py_stop = True
        windows.append((s0, s1))

    benchmark.pedantic(flood, setup=setup, rounds=3, iterations=1)
    per = []
    for s0, s1 in windows:
        delivered = s1[1] - s0[1]
        if s0[3] is not None and s1[3] is not None and delivered:
            per.append((s1[3] - s0[3]) / delivered)
    batches = [(s1[0] - s0[0]) / (s1[2] - s0[2]) for s0, s1 in windows
               if s0[2] is not None and s1[2] - s0[2]]
    benchmark.extra_info.update({
        "consumer": consumer, "k": k, "deliveries_per_round": DELIVERIES,
        "consumer_cpu_ns_per_delivery": sorted(per)[len(per) // 2] if per else None,
        "avg_batch": sorted(batches)[len(batches) // 2] if batches else None,
        "cpus": os.cpu_count()})
    assert all(s1[1] - s0[1] >= DELIVERIES for s0, s1 in windows)
