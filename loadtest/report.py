"""Charts and a summary from one load-test results folder (locust CSVs + the runner's node samples).

Reads only files, so it can redraw a finished run: ``python -m shardmq.loadtest.report results/<timestamp>``.

- ``throughput.png``  requests/s over time per request name and in total, failures/s, user count
  (``locust_stats_history.csv``, written with ``--csv-full-history``).
- ``latency.png``     p50/p95/p99 over time, one panel per request name (locust's "current" percentiles: a
  sliding window of about 10 s). "deliver" is the end-to-end latency publish -> subscriber.
- ``node_rates.png``  per-node rates of the node counters (``status()["metrics"]``) per channel.
- ``node_routes.png`` routes held, clients and root-set size per node.
- ``node_bytes.png``  per-node byte rates per channel and peer (``status()["wire_bytes"]``).
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

LOCUST_PREFIX = "locust"
NODE_CSV = "node_metrics.csv"
NODE_FIXED = ("t", "node", "routes", "clients", "root_set_size")
# Counters charted as per-node rates, grouped by channel (client socket, peer socket, routing, delivery).
RATE_KEYS = (
    "frames_in.client",
    "frames_out.client",
    "frames_in.peer",
    "frames_out.peer",
    "publishes.in",
    "forwards.out",
    "forwards.in",
    "deliveries.qos0",
    "deliveries.qos1",
    "deliveries.redelivered",
    "drops.client_hwm",
    "drops.peer_hwm",
)
PERCENTILES = ("50%", "95%", "99%")


# ---------------------------------------------------------------------------------------------------- reading
def _num(value: str | None) -> float | None:
    try:
        out = float(value) if value not in (None, "", "N/A") else None
    except ValueError:
        return None
    return out if out is not None and math.isfinite(out) else None


def read_history(path: Path) -> dict[str, dict[str, Any]]:
    """``{name: {"t": [...], "rps": [...], "fps": [...], "users": [...], "size": [...], "count": [...],
    "50%": [...], ...}}`` plus ``"type"`` (the request type, e.g. publish/deliver); the total is under
    "Aggregated". Rows without requests in locust's window have no percentiles (NaN)."""
    series: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    types: dict[str, str] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            t = _num(row.get("Timestamp"))
            if t is None:
                continue
            s = series[row.get("Name") or "?"]
            s["t"].append(t)
            s["rps"].append(_num(row.get("Requests/s")) or 0.0)
            s["fps"].append(_num(row.get("Failures/s")) or 0.0)
            s["users"].append(_num(row.get("User Count")) or 0.0)
            s["size"].append(_num(row.get("Total Average Content Size")) or 0.0)
            s["count"].append(_num(row.get("Total Request Count")) or 0.0)
            s["failures"].append(_num(row.get("Total Failure Count")) or 0.0)
            types[row.get("Name") or "?"] = row.get("Type") or ""
            for p in PERCENTILES:
                value = _num(row.get(p))
                # Locust writes 0 when the window holds no request: a gap, not a 0 ms latency.
                s[p].append(math.nan if value is None or (value == 0 and not s["rps"][-1]) else value)
    return {name: {**s, "type": types.get(name, "")} for name, s in series.items()}


def read_stats(path: Path) -> list[dict[str, Any]]:
    """Locust's final ``_stats.csv`` rows as dicts (numbers parsed), "Aggregated" last."""
    rows = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            rows.append({k: (_num(v) if k not in ("Type", "Name") else v) for k, v in row.items()})
    return rows


def write_node_csv(samples: Iterable[dict[str, Any]], path: Path) -> int:
    """Samples ``{"t", "node", "routes", "clients", "root_set_size", "metrics": {...}}`` -> one wide CSV row each
    (one column per metric key seen). Returns the number of rows."""
    samples = list(samples)
    keys = sorted({k for s in samples for k in s.get("metrics", {})})
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*NODE_FIXED, *keys])
        for s in samples:
            m = s.get("metrics", {})
            writer.writerow(
                [f"{s['t']:.3f}", s["node"], *(s.get(k, "") for k in NODE_FIXED[2:])] + [m.get(k, 0) for k in keys]
            )
    return len(samples)


def read_node_csv(path: Path) -> dict[str, dict[str, list[float]]]:
    """``{node: {column: [values]}}`` in time order."""
    nodes: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            node = nodes[row["node"]]
            for key, value in row.items():
                if key != "node":
                    parsed = _num(value)
                    node[key].append(math.nan if parsed is None else parsed)
    return {name: dict(cols) for name, cols in sorted(nodes.items())}


def rates(t: Sequence[float], counter: Sequence[float]) -> tuple[list[float], list[float]]:
    """Per-second rate of a monotonic counter between consecutive samples (a reset counts as 0). Samples with
    the same time as the previous one (locust's whole-second timestamps) are merged into the next interval."""
    xs: list[float] = []
    ys: list[float] = []
    last = 0
    for i in range(1, len(t)):
        dt = t[i] - t[last]
        if dt > 0 and not (math.isnan(counter[i]) or math.isnan(counter[last])):
            xs.append(t[i])
            ys.append(max(0.0, counter[i] - counter[last]) / dt)
            last = i
    return xs, ys


# ---------------------------------------------------------------------------------------------------- charts
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(plt: Any, panels: int, title: str, ncols: int = 2, height: float = 2.6) -> tuple[Any, list[Any]]:
    ncols = max(1, min(ncols, panels))
    nrows = max(1, math.ceil(panels / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, height * nrows + 0.8), squeeze=False, sharex=True)
    flat = [ax for row in axes for ax in row]
    for ax in flat[panels:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, flat[:panels]


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_throughput(history: dict[str, dict[str, Any]], path: Path, t0: float) -> Path:
    """Per-second rates from locust's cumulative counts (its Requests/s column is a ~10 s sliding average)."""
    plt = _pyplot()
    fig, (ax, ax_bytes, ax_fail) = plt.subplots(3, 1, figsize=(11, 9), sharex=True, height_ratios=[3, 1.5, 1])
    by_type: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for name in sorted(n for n in history if n != "Aggregated"):
        s = history[name]
        xs, ys = rates(s["t"], s["count"])
        ax.plot([x - t0 for x in xs], ys, label=name, linewidth=1.2)
        size = dict(zip(s["t"], s["size"], strict=True))
        for x, y in zip(xs, ys, strict=True):
            by_type[str(s["type"])][x - t0] += y * size[x]
    for kind, points in sorted(by_type.items()):
        if any(points.values()):
            ts = sorted(points)
            label = {"publish": "publish (client -> node)", "deliver": "deliver (node -> client)"}.get(kind, kind)
            ax_bytes.plot(ts, [points[t] / 1e3 for t in ts], label=label, linewidth=1.2)
    if "Aggregated" in history:
        s = history["Aggregated"]
        xs, ys = rates(s["t"], s["count"])
        ax.plot([x - t0 for x in xs], ys, label="total", color="black", linewidth=2)
        xs, ys = rates(s["t"], s["failures"])
        ax_fail.plot([x - t0 for x in xs], ys, color="tab:red", label="failures/s")
        users = ax_fail.twinx()
        users.plot([t - t0 for t in s["t"]], s["users"], color="tab:gray", linestyle="--", label="users")
        users.set_ylabel("users")
        users.set_ylim(bottom=0)
    ax.set_ylabel("requests/s")
    ax.set_title("throughput per request name (locust, per second)")
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    ax_bytes.set_ylabel("payload kB/s")
    ax_bytes.set_title("payload bytes per direction, client side (requests/s x mean payload size)", fontsize=10)
    ax_bytes.legend(fontsize=8, loc="upper left")
    ax_fail.set_ylabel("failures/s (red)")
    ax_fail.set_xlabel("seconds since start")
    for a in (ax, ax_bytes, ax_fail):
        a.set_ylim(bottom=0)
        a.grid(alpha=0.3)
    return _save(plt, fig, path)


def plot_latency(history: dict[str, dict[str, Any]], path: Path, t0: float, min_count: int = 50) -> Path:
    plt = _pyplot()
    # One-off operations (connect, the wildcard subscribe) make flat, misleading panels: they are in the CSVs.
    names = sorted(n for n in history if n != "Aggregated" and max(history[n]["count"], default=0) >= min_count)
    names += ["Aggregated"] if "Aggregated" in history else []
    fig, axes = _grid(plt, len(names), "latency percentiles over time (ms; sliding ~10 s window)")
    colors = {"50%": "tab:blue", "95%": "tab:orange", "99%": "tab:red"}
    for ax, name in zip(axes, names, strict=True):
        s = history[name]
        ts = [t - t0 for t in s["t"]]
        for p in PERCENTILES:
            ax.plot(ts, s[p], label=f"p{p.rstrip('%')}", color=colors[p], linewidth=1.2)
        _finish_axes(ax, name if name != "deliver" else "deliver (end to end)", "ms")
    return _save_grid(plt, fig, axes, path)


def _finish_axes(ax: Any, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")


def _save_grid(plt: Any, fig: Any, axes: Sequence[Any], path: Path) -> Path:
    """Label the bottom row of a grid of time plots and save it."""
    for ax in axes[-2:]:
        ax.set_xlabel("seconds since start")
        ax.tick_params(labelbottom=True)
    return _save(plt, fig, path)


def plot_node_rates(nodes: dict[str, dict[str, list[float]]], path: Path, t0: float, keys: Sequence[str]) -> Path:
    plt = _pyplot()
    fig, axes = _grid(plt, len(keys), "per-node rates (node status() metrics, per second)", ncols=2, height=2.2)
    for ax, key in zip(axes, keys, strict=True):
        for name, cols in nodes.items():
            if key in cols:
                xs, ys = rates(cols["t"], cols[key])
                ax.plot([x - t0 for x in xs], ys, label=name, linewidth=1.2)
        _finish_axes(ax, key, "/s")
    return _save_grid(plt, fig, axes, path)


def plot_node_routes(nodes: dict[str, dict[str, list[float]]], path: Path, t0: float) -> Path:
    plt = _pyplot()
    fig, axes = _grid(plt, 3, "per-node state", ncols=3, height=3.0)
    for ax, key in zip(axes, ("routes", "clients", "root_set_size"), strict=True):
        for name, cols in nodes.items():
            ax.plot([t - t0 for t in cols["t"]], cols.get(key, []), label=name, linewidth=1.2)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("seconds since start")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def byte_keys(nodes: dict[str, dict[str, list[float]]]) -> list[str]:
    """Counters of bytes per channel the nodes report (``status()["wire_bytes"]``: ``bytes_in.client``,
    ``bytes_out.peer.n2``, ...). Hand-off byte counters are left out: they move only during a rebalance."""
    return sorted({k for cols in nodes.values() for k in cols if "bytes" in k and not k.startswith("handoff.")})


def make_charts(results: Path, prefix: str = LOCUST_PREFIX) -> list[Path]:
    """Draw every chart the folder has data for; returns the PNGs written."""
    history_csv, node_csv = results / f"{prefix}_stats_history.csv", results / NODE_CSV
    history = read_history(history_csv) if history_csv.exists() else {}
    nodes = read_node_csv(node_csv) if node_csv.exists() else {}
    starts = [s["t"][0] for s in history.values() if s["t"]] + [c["t"][0] for c in nodes.values() if c.get("t")]
    t0 = min(starts, default=0.0)
    out = []
    if history:
        out.append(plot_throughput(history, results / "throughput.png", t0))
        out.append(plot_latency(history, results / "latency.png", t0))
    if nodes:
        present = [k for k in RATE_KEYS if any(k in cols for cols in nodes.values())]
        if present:
            out.append(plot_node_rates(nodes, results / "node_rates.png", t0, present))
        out.append(plot_node_routes(nodes, results / "node_routes.png", t0))
        if keys := byte_keys(nodes):
            out.append(plot_node_rates(nodes, results / "node_bytes.png", t0, keys))
    return out


# ---------------------------------------------------------------------------------------------------- summary
def summarize(results: Path, prefix: str = LOCUST_PREFIX) -> dict[str, Any]:
    """Totals from locust's final stats and the first/last node samples."""
    summary: dict[str, Any] = {"requests": {}, "nodes": {}}
    stats_csv = results / f"{prefix}_stats.csv"
    if stats_csv.exists():
        for row in read_stats(stats_csv):
            summary["requests"][row["Name"]] = {
                "type": row.get("Type") or "",
                "count": int(row.get("Request Count") or 0),
                "failures": int(row.get("Failure Count") or 0),
                "rps": row.get("Requests/s") or 0.0,
                "p50_ms": row.get("50%"),
                "p99_ms": row.get("99%"),
            }
    node_csv = results / NODE_CSV
    if node_csv.exists():
        for name, cols in read_node_csv(node_csv).items():
            t = cols["t"]
            span = (t[-1] - t[0]) if len(t) > 1 else 0.0
            entry: dict[str, Any] = {"routes": int(cols["routes"][-1]), "samples": len(t)}
            for key in RATE_KEYS:
                if key in cols and span > 0:
                    entry[f"{key}/s"] = round((cols[key][-1] - cols[key][0]) / span, 1)
            summary["nodes"][name] = entry
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{'request':<26}{'count':>10}{'fail':>8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"]
    for name, r in summary["requests"].items():
        p50 = "-" if r["p50_ms"] is None else f"{r['p50_ms']:.0f}"
        p99 = "-" if r["p99_ms"] is None else f"{r['p99_ms']:.0f}"
        label = "TOTAL (all names)" if name == "Aggregated" else name
        lines.append(f"{label:<26}{r['count']:>10,}{r['failures']:>8,}{r['rps']:>10,.1f}{p50:>9}{p99:>9}")
    if summary["nodes"]:
        keys = ("publishes.in/s", "forwards.out/s", "deliveries.qos0/s", "deliveries.qos1/s", "frames_in.peer/s")
        lines.append("")
        lines.append(f"{'node':<6}{'routes':>12}" + "".join(f"{k:>19}" for k in keys))
        for name, n in summary["nodes"].items():
            lines.append(f"{name:<6}{n['routes']:>12,}" + "".join(f"{n.get(k, 0):>19,.1f}" for k in keys))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="redraw the charts and the summary of a load-test results folder")
    parser.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    for png in make_charts(args.results):
        print(png)
    print(format_summary(summarize(args.results)))


if __name__ == "__main__":
    main()
