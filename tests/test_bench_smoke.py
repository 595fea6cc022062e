"""Smoke test of ``kvmirqfast bench`` in its smallest mode: rows exist and numbers are sane.

No timing thresholds: whether a target is met depends on the machine, not on correctness.
"""
import json

import pytest

from kvmirqfast import bench, cli


@pytest.fixture(scope="module")
def result():
    return bench.run(config=bench.Config.tiny(), only=list(bench.FIGURES), out=None)


def _rows(res, prefix):
    return [r for r in res.rows if r.figure.startswith(prefix)]


def test_every_figure_has_rows(result):
    have_c = bench.c_library()[0] is not None
    for prefix in ("flood K=16: CPU/delivery", "flood K=64: CPU/delivery", "flood flat in K",
                   "python load K=64", "retarget 1 of 256: direct vs table",
                   "assign+deassign flat", "memory: native bytes/irqfd",
                   "memory: RSS growth/irqfd"):
        assert _rows(result, prefix), prefix
    if have_c:
        for prefix in ("ping-pong blocking: median", "ping-pong poll", "eventfd write K=1",
                       "ping-pong work, one thread"):
            assert _rows(result, prefix), prefix
        assert {r.baseline for r in _rows(result, "ping-pong work, one thread")} == {
            "C read", "C epoll_wait(0) + read", "pure Python epoll.poll(0) + read"}
        assert {r.baseline for r in _rows(result, "flood K=16: CPU/delivery")} >= {
            "naive C", "pure Python", "asyncio"}
        multishot = [r for r in _rows(result, "flood K=16: CPU/delivery")
                     if r.baseline == "C, io_uring multishot reads"]
        skipped = [n for n in result.notes if "io_uring multishot reads skipped" in n]
        assert multishot or skipped      # measured, or skipped with the reason


def test_numbers_are_positive(result):
    positive = ("flood", "ping-pong", "retarget", "assign", "deassign", "eventfd write",
                "memory: native")
    for r in result.rows:
        if r.figure.startswith(positive) and "avg batch" not in r.figure:
            assert r.value is not None and r.value > 0, (r.figure, r.value)
            if r.baseline and r.baseline_value is not None:
                assert r.baseline_value > 0, (r.figure, r.baseline)
                assert r.ratio > 0
    native = _rows(result, "memory: native bytes/irqfd")[0]
    from kvmirqfast._engine import IrqfdRecord
    assert native.value == IrqfdRecord.native_size()
    load = _rows(result, "python load K=64: rate loaded/idle")[0]
    assert load.value is not None and load.value >= 0


def test_targets_are_judged(result):
    judged = [r for r in result.rows if r.met is not None]
    assert judged
    assert all(r.target for r in judged)


def test_table_and_json(result):
    table = bench.format_table(result)
    assert "kvmirqfast bench (tiny" in table
    assert "targets met:" in table
    for r in result.rows:
        assert r.figure in table
    doc = json.loads(json.dumps(bench.to_json(result), default=str))
    assert doc["machine_info"]["cpu"]["count"]
    assert doc["benchmarks"]
    for b in doc["benchmarks"]:
        assert b["name"] and "extra_info" in b
        # RSS is page-granular: the tiny run's 256 irqfds may fit in pages already resident.
        if b["name"].startswith("memory[rss"):
            assert b["stats"]["median"] >= 0
        else:
            assert b["stats"]["median"] > 0, b["name"]


def test_unknown_figure_is_refused():
    with pytest.raises(ValueError):
        bench.run(config=bench.Config.tiny(), only=["nope"])


def test_plot_without_matplotlib_says_so(capsys):
    if bench.have_matplotlib():
        pytest.skip("matplotlib is installed")
    assert cli.main(["bench", "--plot", "x.png"]) == 2
    assert "matplotlib" in capsys.readouterr().err


def test_plot_data_is_cost_against_k_and_n(result):
    # What --plot draws: CPU per delivery against K for each consumer, and assign/deassign cost
    # per irqfd against N.  Checked without matplotlib.
    from kvmirqfast.bench.driver import _assign_key, _flood_key, _series
    flood = _series(result, "flood", _flood_key)
    assert [k for k, _ in flood["kvmirqfast"]] == [16, 64]
    assert {"pure Python", "asyncio"} <= set(flood)
    assign = _series(result, "assign", _assign_key)
    for op in ("assign", "deassign"):
        points = assign[f"kvmirqfast {op}"]
        assert [n for n, _ in points] == [16, 128] and all(s > 0 for _, s in points)


def test_plot_is_written(result, tmp_path):
    if not bench.have_matplotlib():
        pytest.skip("matplotlib is not installed (pip install 'kvmirqfast[plot]')")
    from kvmirqfast.bench.driver import write_plot
    path = tmp_path / "bench.png"
    write_plot(result, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pingpong_vcpu_failure_is_raised_not_hung(monkeypatch):
    """A vCPU loop that fails releases the C device thread and its error reaches the caller
    (the device would otherwise block in read() for an answer that never comes)."""
    lib, reason = bench.c_library()
    if lib is None:
        pytest.skip(reason)
    from kvmirqfast.bench import pingpong

    class FaultyVm(pingpong.Vm):
        def create_vcpu(self, vcpu_id):
            cpu = super().create_vcpu(vcpu_id)

            class Faulty:
                wait_interrupt, eoi = cpu.wait_interrupt, cpu.eoi

                def ack(self):
                    raise RuntimeError("guest fault")
            return Faulty()

    monkeypatch.setattr(pingpong, "Vm", FaultyVm)
    with pytest.raises(RuntimeError, match="guest fault"):
        pingpong._pp_kvmirqfast(lib, 1000, 0, 30.0)
