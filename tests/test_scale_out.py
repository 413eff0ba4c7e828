"""``loadtest/scale_out.py`` runs end to end, small (N = 1..2, about 1 s each). Its figures depend on the machine
and on whatever else runs on it, so only that it ran, printed them, lost nothing without saying so and stopped
everything it started is checked."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from shardmq.loadtest import scale_out


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.timeout(240)
def test_scale_out_runs_reports_its_figures_and_loses_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    results = scale_out.main(["--max-nodes", "2", "--seconds", "1", "--topics-per-pair", "20"])
    out = capsys.readouterr().out
    assert [r.nodes for r in results] == [1, 2]
    for r in results:
        assert r.error is None, r.error
        assert r.sent > 0 and r.received > 0 and r.duplicates == 0
        assert len(r.pair_rates) == r.nodes and all(rate > 0 for rate in r.pair_rates)
        # The publishers flushed before the counting ended; QoS 0 may still drop under overload, but never
        # uncounted: the subscribers' ``dropped`` or the nodes' drops.*/errors.* counters say so.
        assert r.loss <= r.dropped_reported, f"N={r.nodes}: {r.loss} lost, {r.dropped_reported} counted"
        pairs = range(r.nodes)
        expected = {f"node n{j + 1}" for j in pairs} | {f"pub {i}" for i in pairs} | {f"sub {i}" for i in pairs}
        assert set(r.cpu) == expected and all(cpu >= 0 for cpu in r.cpu.values())
        assert r.aggregate > 0 and r.projected > 0
        assert not [name for name, pid in r.pids.items() if running(pid)]  # every process it started is gone
    assert not mp.active_children()
    for needle in ("aggregate msg/s", "vs N x one pair", "CPU per message", "per core: one pair", "N=2: node n1"):
        assert needle in out
