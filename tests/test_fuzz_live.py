"""The live fuzz, bounded: random and mutated frames to a running node's client and peer ports while a QoS 1 pair
runs through the cluster (``shardmq.loadtest.fuzz.fuzz_live``; the script runs it longer:
``python -m shardmq.loadtest.fuzz --target live --seconds 120``).

No node dies, nothing acknowledged is lost for the pair, every refusal is counted (the node's ``errors.*`` grew by
at least the ERRORs the fuzzing client got), the made-up peer (a CURVE client with a key of no member, on the
secure default) is refused at the handshake and counted (``security.peer_keys_refused``) without one of its frames
reaching a handler, and no handler raised (``errors.internal``). Every process is stopped by pid by ``fuzz_live``
itself. Peer frames from a stranger that does get through (``--insecure``) are fuzzed by
``python -m shardmq.loadtest.fuzz --target live --insecure`` and by ``tests/test_bad_input.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shardmq.loadtest.fuzz import fuzz_live

SECONDS = float(os.environ.get("FUZZ_LIVE_SECONDS", "12"))


@pytest.mark.timeout(180)
def test_live_fuzz_keeps_nodes_and_pair(tmp_path: Path) -> None:
    result = fuzz_live(SECONDS, seed=12, directory=tmp_path)
    print(result.report.render())
    assert all(result.alive.values()), result.alive
    assert result.acked > 0, "the pair published nothing: the fuzz starved it"
    assert result.lost == 0, result.report.findings
    assert result.refusals_expected > 0 and result.refusals_grew >= result.refusals_expected, result.counters
    # The made-up peer speaks CURVE with a key of no member: refused at the handshake, its frames never decoded.
    assert result.counters.get("security.peer_keys_refused", 0) > 0, result.counters
    assert result.counters.get("errors.not_member", 0) == 0, result.counters
    assert result.internal_errors == 0, result.report.findings
    assert not result.report.findings
