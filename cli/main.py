"""The ``shardmq`` command: run a node, manage a local cluster, publish and subscribe from a terminal."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from shardmq.client import Client, ShardMQError
from shardmq.ring import DEFAULT_REPLICATION, DEFAULT_SHARD_COUNT
from shardmq.shard.logs import configure_logging

DEFAULT_DIR = ".shardmq"


def _client(args: argparse.Namespace) -> Client:
    """A client of ``--endpoint`` (with ``--credentials``, else ``SHARDMQ_CREDENTIALS``), or of the local cluster
    in ``--dir`` (with ``--credentials``, else that cluster's ``admin.creds``)."""
    if args.endpoint:
        return Client(args.endpoint, credentials=args.credentials)
    from shardmq.testing import LocalCluster

    state_dir = Path(args.dir)
    if not (state_dir / "cluster.json").exists():
        sys.exit(f"no --endpoint given and no cluster in {state_dir}: run `shardmq cluster up` first")
    lc = LocalCluster.load(state_dir)
    assert lc.state is not None
    return Client(lc.state.client_endpoints(), credentials=args.credentials or lc.admin_credentials)


def cmd_node(args: argparse.Namespace) -> None:
    from shardmq.shard.node import Node, NodeConfig

    Node(
        NodeConfig(
            node_id=args.id,
            client_endpoint=args.client_endpoint,
            peer_endpoint=args.peer_endpoint,
            etcd_url=args.etcd,
            etcd_user=args.etcd_user,
            etcd_password_file=args.etcd_password_file,
            etcd_ca_cert=args.etcd_ca_cert,
            etcd_client_cert=args.etcd_client_cert,
            etcd_client_key=args.etcd_client_key,
            cluster_key_file=args.cluster_key_file,
            insecure=args.insecure,
            cluster=args.cluster,
            weight=args.weight,
            shard_count=args.shard_count,
            replication=args.replication,
            lease_ttl=args.lease_ttl,
            max_payload=args.max_payload,
            client_idle_check=args.client_idle_check,
            route_cache_size=args.route_cache_size,
            route_cache_ttl=args.route_cache_ttl,
            max_waiting_publishes=args.max_waiting_publishes,
            max_inflight=args.max_inflight,
            max_queued=args.max_queued,
            max_session_bytes=args.max_session_bytes,
            endpoint_file=args.endpoint_file,
            advertise_peer_endpoint=args.advertise_peer_endpoint,
            metrics_port=args.metrics_port,
            metrics_address=args.metrics_address,
            data_dir=args.data_dir,
            fsync=args.fsync,
        )
    ).run()


def cmd_cluster_up(args: argparse.Namespace) -> None:
    from shardmq.testing import LocalCluster

    lc = LocalCluster(
        args.dir,
        nodes=args.nodes,
        shard_count=args.shard_count,
        replication=args.replication,
        lease_ttl=args.lease_ttl,
        base_port=args.base_port,
        insecure=args.insecure,
        data_dirs=not args.no_data_dir,
        fsync=args.fsync,
    )
    if args.insecure:
        print("warning: --insecure: nodes will neither authenticate nor encrypt peer or client traffic",
              file=sys.stderr)  # fmt: skip
    print(f"starting etcd and {args.nodes} nodes in {lc.dir} ...", flush=True)
    try:
        state = lc.up()
    except (RuntimeError, TimeoutError) as exc:  # a refusal or a failed start: the message says what to do
        sys.exit(f"error: {exc}")
    print(f"cluster '{state.cluster}' ready; etcd {state.etcd_url}")
    for node in state.nodes:
        print(f"  {node.name}  pid {node.pid}  clients: {node.client_endpoint}")
    if lc.admin_credentials:
        print(f"operator credentials (allowed everything): {lc.admin_credentials}")
        print(f"  export SHARDMQ_CREDENTIALS={lc.admin_credentials}   # for the SDK; `shardmq creds add` makes more")
    print(f"stop it with: shardmq cluster down --dir {args.dir}")


def cmd_cluster_restart(args: argparse.Namespace) -> None:
    from shardmq.testing import LocalCluster

    if not (Path(args.dir) / "cluster.json").exists():
        sys.exit(f"no cluster recorded in {args.dir}: run `shardmq cluster up --dir {args.dir}` first")
    lc = LocalCluster.load(args.dir)
    print(f"restarting what stopped of the cluster in {lc.dir} ...", flush=True)
    try:
        done = lc.restart(timeout=args.timeout, progress=lambda msg: print(f"  {msg}", flush=True))
    except (RuntimeError, TimeoutError) as exc:
        sys.exit(f"error: {exc}")
    if done:
        print(f"restarted: {', '.join(r.name for r in done)}")
    else:
        print("nothing to restart: etcd and every node were running")
    # Readiness does not include shard moves: a restarted node is filled by hand-offs after it registers.
    print(f"shard moves may still be running; `shardmq rebalance apply --dir {args.dir}` waits for them")


def print_status(status: dict[str, Any]) -> None:
    nodes = status["nodes"]
    print(f"cluster {status['cluster']}  etcd {status['etcd']}")
    print(
        f"{'node':<6} {'alive':<6} {'endpoint':<24} {'shards':>7} {'primary':>8} {'routes':>10} {'B/route':>8}"
        f" {'RSS MB':>8} {'clients':>8}"
    )
    for n in nodes:
        rss = f"{n['rss_bytes'] / 2**20:.0f}" if "rss_bytes" in n else "-"
        print(
            f"{n['id']:<6} {'yes' if n['alive'] else 'NO':<6} {n['client_endpoint']:<24} {n.get('shards', '-'):>7} "
            f"{n.get('primary_shards', '-'):>8} {n.get('routes', '-'):>10} {n.get('bytes_per_route') or '-':>8}"
            f" {rss:>8} {n.get('clients', '-'):>8}"
        )
    live = [n for n in nodes if n["alive"]]
    for n in live:
        moving = n.get("handoffs_out", []) + n.get("handoffs_in", [])
        if moving:
            print(f"  {n['id']}: hand-offs in progress for shards {sorted(set(moving))[:20]}")
        if "rebalance" in n:
            r = n["rebalance"]
            print(f"  leader {n['id']}: {r['moves_in_progress']} moves in progress, {r['moves_remaining']} remaining,"
                  f" {r['shards_flipped']} flipped, {r['promotions']} promoted, settled={r['settled']}")
    if live:
        first = live[0]
        epochs = [n["max_shard_epoch"] for n in live]
        print(f"assignment version {first['assignment_version']}  highest shard epoch {max(epochs)}"
              f"  (per-shard epochs: cluster status --json)")
        print(
            f"members {first['members']}  membership epoch {first['membership_epoch']}"
            f"  shards {first['shard_count']} x R={first['replication']}"
            f"  root-set size {first['root_set_size']} (held on every node; the part that does not scale)"
        )


def cmd_cluster_status(args: argparse.Namespace) -> None:
    from shardmq.testing import LocalCluster

    status = LocalCluster.load(args.dir).status()
    if args.json:
        print(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode())
    else:
        print_status(status)


def cmd_cluster_down(args: argparse.Namespace) -> None:
    from shardmq.testing import LocalCluster

    if not (Path(args.dir) / "cluster.json").exists():
        print(f"no cluster running from {args.dir}")
        return
    LocalCluster.load(args.dir).down()
    print("cluster stopped")


def cmd_cluster_join(args: argparse.Namespace) -> None:
    from shardmq.testing import LocalCluster

    lc = LocalCluster.load(args.dir)
    print("starting a node and waiting for its shards to be handed over ...", flush=True)
    proc = lc.join(args.id)
    print(f"{proc.name} joined: pid {proc.pid}, clients: {proc.client_endpoint}")
    print_status(lc.status())


def cmd_cluster_leave(args: argparse.Namespace) -> None:
    from shardmq.testing import LocalCluster

    lc = LocalCluster.load(args.dir)
    print(f"{args.node} is handing its shards off before it exits ...", flush=True)
    lc.leave(args.node)
    print(f"{args.node} left")
    print_status(lc.status())


def cmd_cluster_remove(args: argparse.Namespace) -> None:
    from shardmq.testing import LocalCluster

    lc = LocalCluster.load(args.dir)
    lc.remove(args.node)
    print(f"{args.node} removed; its shards were reassigned")
    print_status(lc.status())


def cmd_rebalance_plan(args: argparse.Namespace) -> None:
    from shardmq.testing import LocalCluster

    from .rebalance import plan_report, print_plan

    report = plan_report(LocalCluster.load(args.dir))
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        print_plan(report)


def cmd_rebalance_apply(args: argparse.Namespace) -> None:
    from shardmq.testing import LocalCluster

    from .rebalance import apply

    apply(LocalCluster.load(args.dir), timeout=args.timeout)


def cmd_sub(args: argparse.Namespace) -> None:
    with _client(args) as c:
        c.subscribe(args.filter, qos=args.qos)
        print(f"subscribed to {args.filter!r} via {c.node}; waiting (Ctrl-C to stop)", file=sys.stderr, flush=True)
        received = 0
        try:
            while args.count is None or received < args.count:
                msg = c.receive(timeout=args.timeout)
                if msg is None:
                    break
                received += 1
                print(f"{msg.topic}\t{msg.payload.decode(errors='replace')}", flush=True)
        except KeyboardInterrupt:
            pass


def cmd_pub(args: argparse.Namespace) -> None:
    with _client(args) as c:
        c.publish(args.topic, args.message.encode(), qos=args.qos)
        if args.qos:
            print(f"published to {args.topic!r} via {c.node}, acknowledged")


def cmd_creds_add(args: argparse.Namespace) -> None:
    from shardmq.testing import LocalCluster

    try:
        if args.etcd:  # a cluster of your own: its etcd, its name and its cluster key
            path = _add_credentials_to(args)
        elif not (Path(args.dir) / "cluster.json").exists():
            sys.exit(f"no cluster recorded in {args.dir}: run `shardmq cluster up --dir {args.dir}` first, or name "
                     "a cluster of your own with --etcd, --cluster and --cluster-key-file")  # fmt: skip
        else:
            path = LocalCluster.load(args.dir).add_credentials(args.name, args.publish, args.subscribe, args.admin)
    except (RuntimeError, ValueError, OSError) as exc:
        sys.exit(f"error: {exc}")
    print(f"{path} (mode 0600): principal {args.name!r} may publish to {args.publish or 'nothing'}, subscribe to "
          f"{args.subscribe or 'nothing'}{', administer' if args.admin else ''}")  # fmt: skip


def _add_credentials_to(args: argparse.Namespace) -> Path:
    from shardmq.router.acl import Acl
    from shardmq.shard.membership import EtcdAccess, etcd_client
    from shardmq.shard.security import load_cluster_key
    from shardmq.testing.cluster import make_principal

    if not args.cluster_key_file:
        sys.exit("with --etcd, give --cluster-key-file (the nodes' --cluster-key-file): principals are proven with it")
    access = EtcdAccess.from_files(args.etcd, args.etcd_user, args.etcd_password_file, args.etcd_ca_cert,
                                   args.etcd_client_cert, args.etcd_client_key)  # fmt: skip
    acl = Acl(tuple(args.publish), tuple(args.subscribe), args.admin)
    creds = make_principal(etcd_client(access), args.cluster, load_cluster_key(args.cluster_key_file), args.name, acl)
    path = Path(args.out or f"{args.name}.creds")
    creds.write(path)
    return path


def cmd_creds_revoke(args: argparse.Namespace) -> None:
    from shardmq.testing import LocalCluster

    if not LocalCluster.load(args.dir).revoke_credentials(args.name):
        sys.exit(f"error: no principal {args.name!r} in the cluster of {args.dir}")
    print(f"revoked {args.name!r}: nodes refuse its key and end its sessions")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.dir), nodes=args.nodes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardmq", description=__doc__)
    p.add_argument("--log-level", default="info")
    sub = p.add_subparsers(dest="command", required=True)

    node = sub.add_parser("node", help="run one shard node in the foreground")
    node.add_argument("--id", required=True)
    node.add_argument("--client-endpoint", required=True, help="e.g. tcp://127.0.0.1:7101 (port * = any free)")
    node.add_argument("--peer-endpoint", required=True, help="e.g. tcp://127.0.0.1:7201 (port * = any free)")
    node.add_argument("--etcd", required=True, help="etcd URL, e.g. http://127.0.0.1:2379 (https://: TLS)")
    node.add_argument("--etcd-user", default="", help="etcd user to authenticate as (etcd with auth enabled)")
    node.add_argument("--etcd-password-file", default="", help="file holding that user's password (mode 0600)")
    node.add_argument("--etcd-ca-cert", default="", help="CA file that signed etcd's TLS certificate")
    node.add_argument("--etcd-client-cert", default="", help="client certificate, where etcd asks for one")
    node.add_argument("--etcd-client-key", default="", help="the client certificate's key")
    node.add_argument("--cluster", default="default")
    node.add_argument("--cluster-key-file", default="",
                      help="the cluster's secret (hex): peers prove their keys and principals their records with "
                      "it, and the client port's CURVE key derives from it (`cluster up` makes one)")
    node.add_argument("--insecure", action="store_true",
                      help="no authentication, encryption or ACLs on either port (logged as a warning at every "
                      "start)")
    node.add_argument("--weight", type=int, default=1)
    node.add_argument("--shard-count", type=int, default=DEFAULT_SHARD_COUNT)
    node.add_argument("--replication", type=int, default=DEFAULT_REPLICATION)
    node.add_argument("--lease-ttl", type=int, default=5)
    node.add_argument("--max-payload", type=int, default=1024 * 1024)
    node.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics (0: any free port)")
    node.add_argument("--metrics-address", default="127.0.0.1")
    node.add_argument("--advertise-peer-endpoint", default=None, help="peer endpoint to publish, if not the bound one")
    node.add_argument("--endpoint-file", default=None, help="write the bound endpoints here (JSON)")
    node.add_argument("--client-idle-check", type=float, default=10.0, help="seconds before a quiet client is probed")
    node.add_argument(
        "--route-cache-size", type=int, default=100_000, help="lookup answers the entry node caches (0: no cache)"
    )
    node.add_argument("--route-cache-ttl", type=float, default=1.0, help="seconds a cached lookup answer is used")
    node.add_argument(
        "--max-waiting-publishes", type=int, default=100_000,
        help="stop reading clients while this many publishes wait for lookups; read again at half",
    )  # fmt: skip
    node.add_argument(
        "--max-inflight", type=int, default=1000,
        help="QoS 1 messages written to one client and not yet acknowledged; more wait in its backlog",
    )  # fmt: skip
    node.add_argument(
        "--max-queued", type=int, default=10_000,
        help="QoS 1 messages one client's backlog holds beyond its window; beyond it publishes get 'overloaded'",
    )  # fmt: skip
    node.add_argument(
        "--max-session-bytes", type=int, default=64 * 1024 * 1024,
        help="payload bytes kept for one client (window and backlog); beyond it publishes get 'overloaded'",
    )  # fmt: skip
    node.add_argument(
        "--data-dir", default=None,
        help="keep retained messages and persistent sessions in DATA_DIR/shardmq.db (SQLite, WAL) and load them at "
        "start; every QoS 1 / retained acknowledgement waits for their commit. Without it: in memory only",
    )  # fmt: skip
    node.add_argument(
        "--fsync", choices=["batch", "off"], default="batch",
        help="with --data-dir: 'batch' fsyncs once per loop turn's commit (an acknowledged change survives power "
        "loss); 'off' never fsyncs (it survives kill -9, not power loss or an OS crash)",
    )  # fmt: skip
    node.set_defaults(func=cmd_node)

    cluster = sub.add_parser("cluster", help="a local cluster: private etcd plus N nodes on loopback")
    csub = cluster.add_subparsers(dest="cluster_command", required=True)
    up = csub.add_parser("up")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--dir", default=DEFAULT_DIR)
    up.add_argument("--shard-count", type=int, default=None)
    up.add_argument("--replication", type=int, default=None)
    up.add_argument("--lease-ttl", type=int, default=5)
    up.add_argument("--base-port", type=int, default=None, help="first port to use (default: free ports)")
    up.add_argument("--insecure", action="store_true",
                    help="start nodes without authentication, encryption or ACLs (peers and clients)")
    up.add_argument("--no-data-dir", action="store_true",
                    help="nodes keep everything in memory (default: each node stores retained messages and "
                    "persistent sessions in DIR/<node>/data, kept by `cluster restart`)")
    up.add_argument("--fsync", choices=["batch", "off"], default="batch",
                    help="the nodes' --fsync: 'batch' (default) fsyncs every loop turn's commit; 'off' never")
    up.set_defaults(func=cmd_cluster_up)
    st = csub.add_parser("status")
    st.add_argument("--dir", default=DEFAULT_DIR)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_cluster_status)
    restart = csub.add_parser(
        "restart", help="start again the recorded etcd and nodes that stopped, with their ids, data directories and "
        "ports (a node loads its store before it registers)"
    )
    restart.add_argument("--dir", default=DEFAULT_DIR)
    restart.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for every node to be a member")
    restart.set_defaults(func=cmd_cluster_restart)
    down = csub.add_parser("down")
    down.add_argument("--dir", default=DEFAULT_DIR)
    down.set_defaults(func=cmd_cluster_down)

    join = csub.add_parser("join", help="start one more node; its share of shards is handed over")
    join.add_argument("--dir", default=DEFAULT_DIR)
    join.add_argument("--id", default=None)
    join.set_defaults(func=cmd_cluster_join)
    leave = csub.add_parser("leave", help="gracefully drain a node's shards, then stop it")
    leave.add_argument("node")
    leave.add_argument("--dir", default=DEFAULT_DIR)
    leave.set_defaults(func=cmd_cluster_leave)
    remove = csub.add_parser("remove", help="take a node (alive or dead) out of membership from outside")
    remove.add_argument("node")
    remove.add_argument("--dir", default=DEFAULT_DIR)
    remove.set_defaults(func=cmd_cluster_remove)

    rebalance = sub.add_parser("rebalance", help="shard moves: a dry-run plan, or wait for the leader to finish")
    rsub = rebalance.add_subparsers(dest="rebalance_command", required=True)
    rplan = rsub.add_parser("plan", help="which shards, how many routes and bytes would move, balance after")
    rplan.add_argument("--dir", default=DEFAULT_DIR)
    rplan.add_argument("--json", action="store_true")
    rplan.set_defaults(func=cmd_rebalance_plan)
    rapply = rsub.add_parser("apply", help="wait until the leader has moved every shard, showing progress")
    rapply.add_argument("--dir", default=DEFAULT_DIR)
    rapply.add_argument("--timeout", type=float, default=300.0)
    rapply.set_defaults(func=cmd_rebalance_apply)

    creds = sub.add_parser("creds", help="principals of a local cluster: credentials files and their ACLs")
    crsub = creds.add_subparsers(dest="creds_command", required=True)
    cadd = crsub.add_parser("add", help="make a principal with an ACL and write DIR/NAME.creds (mode 0600)")
    cadd.add_argument("name")
    cadd.add_argument("--dir", default=DEFAULT_DIR)
    cadd.add_argument("--publish", nargs="*", default=[], metavar="FILTER", help="topic filters it may publish to")
    cadd.add_argument("--subscribe", nargs="*", default=[], metavar="FILTER",
                      help="filters it may subscribe within (each requested filter must be covered by one)")
    cadd.add_argument("--admin", action="store_true", help="may make nodes leave and read detailed status")
    cadd.add_argument("--etcd", default="", help="a cluster of your own (not `cluster up`'s): its etcd URL")
    cadd.add_argument("--cluster", default="default", help="with --etcd: the cluster's name (the nodes' --cluster)")
    cadd.add_argument("--cluster-key-file", default="", help="with --etcd: the nodes' --cluster-key-file")
    cadd.add_argument("--out", default="", help="with --etcd: where to write the file (default ./NAME.creds)")
    for flag, help_ in (("--etcd-user", "etcd user"), ("--etcd-password-file", "that user's password file"),
                        ("--etcd-ca-cert", "CA of etcd's TLS certificate"), ("--etcd-client-cert", "client cert"),
                        ("--etcd-client-key", "client certificate's key")):  # fmt: skip
        cadd.add_argument(flag, default="", help=f"with --etcd: {help_}, as the nodes take it")
    cadd.set_defaults(func=cmd_creds_add)
    crevoke = crsub.add_parser("revoke", help="delete a principal: its key is refused, its sessions end")
    crevoke.add_argument("name")
    crevoke.add_argument("--dir", default=DEFAULT_DIR)
    crevoke.set_defaults(func=cmd_creds_revoke)

    for name, func, help_ in (("sub", cmd_sub, "subscribe and print messages"), ("pub", cmd_pub, "publish one")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--endpoint", action="append", help="node endpoint (repeat); default: the local cluster")
        sp.add_argument("--dir", default=DEFAULT_DIR)
        sp.add_argument("--credentials", default=None,
                        help="credentials file (default: SHARDMQ_CREDENTIALS, or the local cluster's admin.creds)")
        sp.add_argument("--qos", type=int, default=0, choices=(0, 1))
        sp.set_defaults(func=func)
        if name == "sub":
            sp.add_argument("filter")
            sp.add_argument("--count", type=int, default=None, help="exit after this many messages")
            sp.add_argument("--timeout", type=float, default=None, help="exit after this many quiet seconds")
        else:
            sp.add_argument("topic")
            sp.add_argument("message")

    demo = sub.add_parser("demo", help="start a local cluster, route wildcard traffic, show what happened")
    demo.add_argument("--dir", default=f"{DEFAULT_DIR}/demo")
    demo.add_argument("--nodes", type=int, default=3)
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        args.func(args)
    except ShardMQError as exc:
        sys.exit(f"error {exc.code}: {exc.reason}")


if __name__ == "__main__":
    main()
