"""Smoke test of the load-test chart/CSV helper on tiny synthetic files (no cluster, no locust run)."""

from __future__ import annotations

import csv
from pathlib import Path

from shardmq.loadtest import report
from shardmq.loadtest.workload import device_topic, make_payload, sent_at

PCTS = ["50%", "66%", "75%", "80%", "90%", "95%", "98%", "99%", "99.9%", "99.99%", "100%"]
HISTORY_COLS = ["Timestamp", "User Count", "Type", "Name", "Requests/s", "Failures/s", *PCTS, "Total Request Count",
                "Total Failure Count", "Total Median Response Time", "Total Average Response Time",
                "Total Min Response Time", "Total Max Response Time", "Total Average Content Size"]  # fmt: skip
STATS_COLS = ["Type", "Name", "Request Count", "Failure Count", "Median Response Time", "Average Response Time",
              "Min Response Time", "Max Response Time", "Average Content Size", "Requests/s", "Failures/s",
              *PCTS]  # fmt: skip


def _write(path: Path, cols: list[str], rows: list[list[object]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(cols)
        writer.writerows(rows)


def test_charts_and_summary_from_tiny_csvs(tmp_path: Path) -> None:
    history = []
    for i in range(5):
        for kind, name in (("publish", "publish qos1 exact"), ("deliver", "deliver"), ("", "Aggregated")):
            pct = ["N/A"] * len(PCTS) if i == 0 else [10 + i] * len(PCTS)
            history.append([1000 + i, 4, kind, name, 100.0 * i, 0.0, *pct, 100 * i, 0, 10, 11.0, 1, 50, 100])
    _write(tmp_path / "locust_stats_history.csv", HISTORY_COLS, history)
    _write(tmp_path / "locust_stats.csv", STATS_COLS, [
        ["publish", "publish qos1 exact", 400, 1, 12, 13.0, 1, 50, 100, 100.0, 0.25, *([12] * len(PCTS))],
        ["", "Aggregated", 800, 1, 12, 13.0, 1, 50, 100, 200.0, 0.25, *([12] * len(PCTS))],
    ])  # fmt: skip
    samples = [
        {"t": 1000.0 + i, "node": node, "routes": 10 * i, "clients": 2, "root_set_size": 1,
         "metrics": {"frames_in.client": 50 * i, "forwards.out": 20 * i, "deliveries.qos1": 30 * i}}
        for i in range(4) for node in ("n1", "n2")
    ]  # fmt: skip
    assert report.write_node_csv(samples, tmp_path / report.NODE_CSV) == 8

    pngs = report.make_charts(tmp_path)
    names = {p.name for p in pngs}
    assert names == {"throughput.png", "latency.png", "node_rates.png", "node_routes.png"}  # no byte counters
    assert all(p.stat().st_size > 1000 for p in pngs)

    summary = report.summarize(tmp_path)
    assert summary["requests"]["Aggregated"]["count"] == 800
    assert summary["requests"]["publish qos1 exact"]["failures"] == 1
    assert summary["nodes"]["n1"]["forwards.out/s"] == 20.0
    assert "TOTAL" in report.format_summary(summary)


def test_rates_and_payload_timestamp() -> None:
    assert report.rates([0, 1, 3], [0, 10, 50]) == ([1, 3], [10.0, 20.0])
    payload = make_payload(7, 100, now=1234.5)
    assert len(payload) == 100 and sent_at(payload) == 1234.5
    assert sent_at(b"garbage") is None
    assert device_topic(42) == "devices/00000042/telemetry"
