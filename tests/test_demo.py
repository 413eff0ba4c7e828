"""The README's main job, ``shardmq demo``: it runs to the end on a fresh directory and shows what it claims
(each subscriber's copies, the retained message, the persistent session back with its queued alerts, the shared
subscription split, the will of a killed client, the ACL refusals), and leaves no process behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shardmq.cli.demo import run_demo


@pytest.mark.timeout(180)
def test_demo_shows_routing_sessions_wills_and_security(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_demo(tmp_path / "demo")
    out = capsys.readouterr().out
    assert re.search(r"archiver\s+4 message\(s\)", out)
    assert "[('lights/hall/state', 'on', 'retain')]" in out
    assert "session_present=True, got ['alert 0', 'alert 1', 'alert 2']" in out
    split = re.search(r"each to one member: \{'worker-0 on n\d': (\d+), 'worker-1 on n\d': (\d+)\}", out)
    assert split is not None and int(split[1]) + int(split[2]) == 10
    assert "status/door-sensor='offline (its will)'" in out
    assert "kitchen-sensor publish to sensors/hall/temp: not_authorized" in out
    assert out.rstrip().endswith("done")
