"""Fuzzing for longer than the suite does: the codec, the node's protocol core, or a live cluster.

    python -m shardmq.loadtest.fuzz --seconds 60 --target core   # codec | core | live; --seed K
    pip install -e '.[fuzz]'                                     # atheris, for coverage-guided codec/core runs

- ``codec``: ``codec.decode`` on arbitrary multipart frames. With atheris the corpus starts from one valid frame
  per type (random bytes never become valid JSON, and orjson is not instrumented); without it, a random loop
  mutates those seeds. Oracle: ``testing.fuzzing.check_codec``.
- ``core``: a short program of frames (client frames, peer frames from members, the node itself, a stranger)
  built by structured choices (``Mutator``) from the seeds and fed to a node of a settled 3-node ``Sim``.
  Atheris makes the choices from its input (``atheris.FuzzedDataProvider``: coverage steers them), else
  ``random.Random(seed)``. Oracle: ``testing.fuzzing.CoreTarget``.
- ``live``: a ``LocalCluster`` (3 node processes, a private etcd, 127.0.0.1) with a QoS 1 publisher/subscriber
  pair on unique payloads, while a raw DEALER on one node's client port and another with a made-up routing id
  on its peer port send random and mutated frames. On the secure default the peer DEALER speaks CURVE with a
  key of no member and is refused at the handshake (``security.peer_keys_refused``); with ``--insecure`` its
  frames reach the node and are refused as a non-member's. At the end: every acknowledged publish was received,
  the nodes still run, every refusal was counted (the node's refusal counters grew by at least the stranger's
  decoded frames plus the ERRORs the client socket got) and ``errors.internal`` (a handler raised) did not
  grow.

Every mode prints executions per second and what it found, with a reproducer for a crash; the exit status is 1
when something was found. Atheris runs in a child process (libFuzzer exits the process when its time is up):
the parent reads its summary. Everything live mode starts is stopped by pid and its temp dir removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# Nothing of shardmq is imported at module level: an atheris child must import it inside instrument_imports.

INTS = [0, 1, 2, 3, 15, 16, 17, -1, -2**63, 2**63 - 1, 2**64 - 1, 2**64, 2**80, -2**80]
FILTERS = ["a/b", "a/+", "#", "+", "a/#", "a/#/b", "#/a", "a+/b", "a/b#", "+a", "", "/", "a//b", "$SYS/#", "a/\x00",
           "a" * 300, "/".join("+" * 60)]  # fmt: skip
NAMES = ["n0", "n1", "n2", "ghost", "", "n1 ", "N1", "n1\x00"]
MISSING = object()


class Choices(Protocol):
    """Where a mutation's decisions come from: a seeded Random, or an atheris input (coverage-guided)."""

    def int_in(self, lo: int, hi: int) -> int: ...

    def blob(self, max_len: int) -> bytes: ...

    def text(self, max_len: int) -> str: ...


class RandomChoices:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def int_in(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def blob(self, max_len: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, max_len))

    def text(self, max_len: int) -> str:
        return "".join(chr(self.rng.choice([97, 98, 47, 43, 35, 0, 233, 0x1F600])) for _ in range(self.rng.randint(0,
                       max_len)))  # fmt: skip


class DataChoices:
    """Decisions read from an atheris input; an exhausted input reads as zeros, i.e. the seed kept as is."""

    def __init__(self, fdp: Any) -> None:
        self.fdp = fdp

    def int_in(self, lo: int, hi: int) -> int:
        return int(self.fdp.ConsumeIntInRange(lo, hi))

    def blob(self, max_len: int) -> bytes:
        return bytes(self.fdp.ConsumeBytes(self.fdp.ConsumeIntInRange(0, max_len)))

    def text(self, max_len: int) -> str:
        return str(self.fdp.ConsumeUnicodeNoSurrogates(self.fdp.ConsumeIntInRange(0, max_len)))


class Mutator:
    """Frames built from the seeds by choices: choice 0 keeps the seed's value, so an empty atheris input is a
    valid frame and coverage-guided inputs grow from there."""

    def __init__(self, names: list[str] | None = None, max_payload: int = 1024 * 1024,
                 never: frozenset[bytes] = frozenset()) -> None:  # fmt: skip
        self.names = names or NAMES
        self.max_payload = max_payload
        self.never = never  # frame types never sent, not even as a swapped type

    def pick(self, c: Choices, items: list[Any]) -> Any:
        return items[c.int_in(0, len(items) - 1)]

    def wild_int(self, c: Choices) -> int:
        kind = c.int_in(0, 2)
        if kind == 0:
            return self.pick(c, INTS)
        return c.int_in(-5, 40) if kind == 1 else c.int_in(-(2**70), 2**70)

    def junk(self, c: Choices, depth: int = 0) -> Any:
        kind = c.int_in(0, 6 if depth < 2 else 4)
        if kind == 0:
            return None
        if kind == 1:
            return bool(c.int_in(0, 1))
        if kind == 2:
            return self.wild_int(c)
        if kind == 3:
            return c.int_in(-1000, 1000) / 7
        if kind == 4:
            return c.text(8)
        if kind == 5:
            return [self.junk(c, depth + 1) for _ in range(c.int_in(0, 3))]
        return {c.text(4): self.junk(c, depth + 1) for _ in range(c.int_in(0, 3))}

    def name(self, c: Choices) -> str:
        return self.pick(c, self.names) if c.int_in(0, 3) else c.text(6)

    def filt(self, c: Choices) -> str:
        return self.pick(c, FILTERS) if c.int_in(0, 3) else c.text(10)

    def wild(self, c: Choices, frame_type: bytes, name: str) -> Any:
        """A value of the right JSON type with the wrong content, so the frame gets past the codec."""
        from shardmq.router import codec

        n = c.int_in(0, 4)
        if name in ("id", "shard", "shard_epoch", "qos", "count", "member_rev", "mid"):
            return self.wild_int(c)
        if name in ("node", "coordinator"):
            return self.name(c)
        if name == "topic":
            return self.filt(c)
        if name == "filters":
            return [self.filt(c) if c.int_in(0, 4) else self.junk(c) for _ in range(n)]
        if name in ("nodes", "targets"):
            return [self.name(c) for _ in range(n)]
        if name in ("shards", "sizes"):
            return [abs(self.wild_int(c)) if name == "shards" else c.int_in(0, 8) for _ in range(n)]
        if name in ("mids", "ids"):
            return [self.wild_int(c) for _ in range(n)]
        if name == "routes" and frame_type == codec.SNAPSHOT:
            return [[self.filt(c), [self.name(c) for _ in range(c.int_in(0, 2))]] for _ in range(n)]
        if name == "routes":
            return [[self.wild_int(c), self.wild_int(c), self.filt(c)] for _ in range(n)]
        if name == "items" and frame_type == codec.FWDS:
            return [[self.wild_int(c), self.filt(c), c.int_in(0, 1)] for _ in range(n)]
        if name == "items":
            return [[self.filt(c), c.int_in(0, 1), None if c.int_in(0, 1) else self.wild_int(c)] for _ in range(n)]
        if name == "stale":
            return [[self.wild_int(c), self.wild_int(c)] for _ in range(n)]
        if name == "member_revs":
            return {self.name(c): self.wild_int(c) for _ in range(n)}
        if name in ("code", "reason"):
            return c.text(10)
        return self.junk(c)

    def header(self, c: Choices, frame_type: bytes) -> dict[str, Any]:
        from shardmq.router import codec
        from shardmq.testing.fuzzing import SEEDS

        seed, _ = SEEDS[frame_type]
        header: dict[str, Any] = {}
        for name in sorted({*seed, *codec.FRAME_FIELDS[frame_type]}):
            mode = c.int_in(0, 4)
            value = (
                seed.get(name, MISSING) if mode == 0 else self.wild(c, frame_type, name) if mode in (1, 2)
                else self.junk(c) if mode == 3 else MISSING
            )  # fmt: skip
            if value is not MISSING:
                header[name] = value
        for _ in range(c.int_in(0, 2) // 2):  # an extra key now and then
            header[self.pick(c, ["id", "fwd", "ref", "move_id", "counts", "detail", "zz", "v"])] = self.junk(c)
        header.setdefault("v", codec.PROTOCOL_VERSION)
        return header

    def frame(self, c: Choices, types: list[bytes]) -> list[bytes]:
        from shardmq.router import codec
        from shardmq.testing.fuzzing import SEEDS, header_bytes

        frame_type = self.pick(c, types)
        raw = header_bytes(self.header(c, frame_type))
        payload = SEEDS[frame_type][1]
        how = c.int_in(0, 15)
        if how == 1:
            payload = c.blob(64)
        elif how == 2:
            payload = b"x" * (self.max_payload + 1)
        elif how == 3:
            raw = raw[: c.int_in(0, len(raw))]
        elif how == 4:
            raw = raw + b"\xff"
        elif how == 5:
            frame_type = self.pick(c, [b"NOPE", b"", b"\xff", *sorted(codec.FRAME_TYPES - self.never)])
        parts = [frame_type, raw, payload]
        if c.int_in(0, 31) == 0:
            parts = self.pick(c, [parts[:2], [*parts, b""], [], [frame_type]])
        return parts

    def program(self, c: Choices, max_frames: int = 6) -> list[tuple[bool, bytes, list[bytes]]]:
        """Frames for the core: (from a peer?, routing id, parts)."""
        from shardmq.router import codec

        client_types, peer_types = sorted(codec.CLIENT_REQUESTS), sorted(codec.PEER_REQUESTS)
        out = []
        for _ in range(1 + c.int_in(0, max_frames - 1)):
            if c.int_in(0, 1):
                ident = self.pick(c, [b"n1", b"n2", b"n0", b"ghost", b"\xff\xfe"])
                out.append((True, ident, self.frame(c, peer_types)))
            else:
                out.append((False, self.pick(c, [b"fz1", b"fz2"]), self.frame(c, client_types)))
        return out


# ---------------------------------------------------------------------------------------------- reports
@dataclass
class Report:
    target: str
    engine: str
    execs: int = 0
    seconds: float = 0.0
    findings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.execs / self.seconds if self.seconds else 0.0

    def render(self) -> str:
        lines = [f"fuzz {self.target} ({self.engine}): {self.execs} executions in {self.seconds:.1f} s = "
                 f"{self.rate:,.0f} execs/s; {len(self.findings)} finding(s)"]  # fmt: skip
        lines += [f"  {k}: {v}" for k, v in self.extra.items()]
        lines += [f"FOUND: {f}" for f in self.findings]
        return "\n".join(lines)


# codec: the parts of one frame; core: (fuzzed node, frames delivered into a rebalance or None for a quiet
# cluster, whether the node's lease is in doubt, [(from a peer?, routing id, parts), ...]).
Input = Any


def build(target: str, c: Choices, mutator: Mutator) -> Input:
    """One execution's input, from choices."""
    from shardmq.router import codec

    if target == "codec":
        return mutator.frame(c, sorted(codec.FRAME_TYPES))
    program = mutator.program(c)
    return mutator.pick(c, ["n0", "n1"]), mutator.pick(c, [None, None, 0, 5, 20]), c.int_in(0, 3) == 0, program


def execute(target: str, given: Input) -> None:
    """Run one input through its oracle; raises on a finding."""
    from shardmq.testing.fuzzing import CoreTarget, check_codec

    if target == "codec":
        check_codec(given)
        return
    fuzzed, rebalancing, fenced, program = given
    core = CoreTarget(fuzzed, rebalancing=rebalancing, fenced=fenced)
    for peer, ident, parts in program:
        core.feed(peer, ident, parts)
    core.afterwards()


def run_one(target: str, c: Choices, mutator: Mutator) -> None:
    execute(target, build(target, c, mutator))


def _shown(given: Input) -> str:
    """An input as Python literals, big payloads abbreviated (a 1 MiB payload would drown the report)."""

    def short(parts: list[bytes]) -> str:
        return "[" + ", ".join(repr(p) if len(p) <= 256 else f"b'x' * {len(p)}" for p in parts) + "]"

    if isinstance(given, tuple):
        fuzzed, rebalancing, fenced, program = given
        frames = ",\n  ".join(f"({peer}, {ident!r}, {short(parts)})" for peer, ident, parts in program)
        return f"CoreTarget({fuzzed!r}, rebalancing={rebalancing!r}, fenced={fenced}) fed:\n  {frames}"
    return short(given)


def fuzz_random(target: str, seconds: float, seed: int) -> Report:
    """The fallback engine: seeded random choices over the structured mutator."""
    report = Report(target, "random")
    mutator = Mutator()
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < seconds:
        # One Random per execution: a finding replays from that one number (--replay).
        key = seed * 1_000_003 + i
        given = build(target, RandomChoices(random.Random(key)), mutator)
        try:
            execute(target, given)
        except Exception as exc:
            report.findings.append(
                f"{type(exc).__name__}: {exc!s:.500}\n  reproduce: python -m shardmq.loadtest.fuzz --target {target} "
                f"--replay {key}\n  input: {_shown(given)}\n{traceback.format_exc(limit=-4)}"
            )
            if len(report.findings) >= 5:
                break
        i += 1
    report.execs, report.seconds = i, time.monotonic() - start
    return report


def replay(target: str, key: int | None, path: str | None) -> int:
    """Run one input again (from a random engine's key, or an atheris crash file) and show what it does."""
    if path is not None:
        data = Path(path).read_bytes()
        if target == "codec":
            given: Input = _split(data)
        else:
            import atheris

            given = build(target, DataChoices(atheris.FuzzedDataProvider(data)), Mutator())
    else:
        given = build(target, RandomChoices(random.Random(key)), Mutator())
    print(f"input: {_shown(given)}")
    try:
        execute(target, given)
    except Exception:
        traceback.print_exc()
        return 1
    print("no finding")
    return 0


# ---------------------------------------------------------------------------------------------- atheris
def _codec_corpus(directory: Path) -> None:
    """One valid frame per type, in the codec target's input format (``_split``)."""
    from shardmq.router import codec
    from shardmq.testing.fuzzing import seed_parts

    directory.mkdir(parents=True, exist_ok=True)
    for frame_type in sorted(codec.FRAME_TYPES):
        parts = seed_parts(frame_type)
        (directory / frame_type.decode()).write_bytes(b"".join(len(p).to_bytes(2, "big") + p for p in parts))


def _split(data: bytes) -> list[bytes]:
    """Length-prefixed parts (2 bytes, big-endian); what is left over is one more part."""
    parts, at = [], 0
    while at + 2 <= len(data) and len(parts) < 5:
        size = int.from_bytes(data[at : at + 2], "big")
        parts.append(data[at + 2 : at + 2 + size])
        at += 2 + size
    if at < len(data):
        parts.append(data[at:])
    return parts


def atheris_child(target: str, seconds: int, seed: int, workdir: str) -> None:
    """Runs inside the child: instrument shardmq, then hand over to libFuzzer (which exits the process)."""
    import atheris

    with atheris.instrument_imports(include=["shardmq"]):
        from shardmq.router import codec  # noqa: F401
        from shardmq.testing.fuzzing import check_codec

    work = Path(workdir)
    stats = work / "execs"
    mutator = Mutator()
    count = [0, time.monotonic()]

    def one(data: bytes) -> None:
        count[0] += 1
        if count[0] % 256 == 0 or time.monotonic() - count[1] > 1:
            count[1] = time.monotonic()
            stats.write_text(str(count[0]))  # libFuzzer's own exit skips Python's atexit: the parent reads this
        if target == "codec":
            check_codec(_split(data))
        else:
            run_one("core", DataChoices(atheris.FuzzedDataProvider(data)), mutator)

    corpus = work / "corpus"
    if target == "codec":
        _codec_corpus(corpus)
    else:
        corpus.mkdir(parents=True, exist_ok=True)
        (corpus / "empty").write_bytes(b"")  # every choice 0: the seeds as they are
        rng = random.Random(seed)
        for i in range(64):  # random choices too: the empty input alone left most mutations to find first
            (corpus / f"random-{i}").write_bytes(rng.randbytes(rng.randint(16, 512)))
    argv = [sys.argv[0], f"-max_total_time={seconds}", f"-seed={seed or 1}", f"-artifact_prefix={work}/",
            "-print_final_stats=1", str(corpus)]  # fmt: skip
    atheris.Setup(argv, one)
    atheris.Fuzz()


def fuzz_atheris(target: str, seconds: int, seed: int) -> Report:
    report = Report(target, "atheris")
    work = Path(tempfile.mkdtemp(prefix=f"shardmq-fuzz-{target}-"))
    try:
        start = time.monotonic()
        cmd = [sys.executable, "-m", "shardmq.loadtest.fuzz", "--atheris-child", target, "--seconds", str(seconds),
               "--seed", str(seed), "--workdir", str(work)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
        report.seconds = time.monotonic() - start
        out = proc.stdout + proc.stderr
        done = re.search(r"Done (\d+) runs in (\d+) second", out)
        if done:
            report.execs, report.seconds = int(done.group(1)), max(1.0, float(done.group(2)))
        elif (work / "execs").exists():
            report.execs = int((work / "execs").read_text() or 0)
        cov = re.findall(r"cov: (\d+) ft: (\d+)", out)
        if cov:
            report.extra["coverage (edges, features)"] = cov[-1]
        for crash in sorted(work.glob("crash-*")) + sorted(work.glob("timeout-*")) + sorted(work.glob("oom-*")):
            data = crash.read_bytes()
            kept = Path.cwd() / crash.name
            shutil.copy(crash, kept)
            report.findings.append(f"{crash.name}\n  reproduce: python -m shardmq.loadtest.fuzz --target {target} "
                                   f"--replay-file {kept}\n  input: {_shown(_atheris_input(target, data)):.3000}")
        if proc.returncode != 0 and not report.findings:
            report.findings.append(f"atheris exited {proc.returncode}:\n{out[-3000:]}")
        elif report.findings:
            tb = out[out.find("=== Uncaught Python exception"):][:3000] if "Uncaught" in out else out[-2000:]
            report.findings.append(tb)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _atheris_input(target: str, data: bytes) -> Input:
    if target == "codec":
        return _split(data)
    import atheris

    return build(target, DataChoices(atheris.FuzzedDataProvider(data)), Mutator())


# ---------------------------------------------------------------------------------------------- live
REFUSAL_PREFIXES = ("errors.", "fencing.refused.", "qos1.refused", "security.")


def _refusals(metrics: dict[str, int]) -> int:
    return sum(v for k, v in metrics.items() if k.startswith(REFUSAL_PREFIXES) and k != "errors.internal")


class Pair:
    """A QoS 1 publisher and subscriber on unique payloads, each on its own node and thread."""

    def __init__(self, pub_endpoints: list[str], sub_endpoints: list[str], topic: str) -> None:
        from shardmq.client import Client

        self.topic = topic
        self.acked: set[bytes] = set()
        self.received: set[bytes] = set()
        self.publish_failures: Counter[str] = Counter()
        self.interrupted = 0
        self.stop = threading.Event()
        self.published = threading.Event()  # the publisher thread ended: ``acked`` is final
        self.lock = threading.Lock()
        self.drain_deadline = float("inf")
        self.sub = Client(sub_endpoints, client_id=f"fuzz-sub-{uuid.uuid4().hex[:6]}", timeout=3.0)
        self.sub.subscribe(topic, qos=1)
        self._pub_endpoints = pub_endpoints
        self.threads = [threading.Thread(target=self._publish, daemon=True),
                        threading.Thread(target=self._receive, daemon=True)]  # fmt: skip
        for t in self.threads:
            t.start()

    def _publish(self) -> None:
        from shardmq.client import Client, ShardMQError

        try:
            with Client(self._pub_endpoints, client_id=f"fuzz-pub-{uuid.uuid4().hex[:6]}", timeout=3.0) as c:
                i = 0
                while not self.stop.is_set():
                    payload = f"{uuid.uuid4().hex}-{i}".encode()
                    try:
                        c.publish(self.topic, payload, qos=1)
                        with self.lock:
                            self.acked.add(payload)
                    except (ShardMQError, TimeoutError) as exc:
                        self.publish_failures[getattr(exc, "code", type(exc).__name__)] += 1
                    i += 1
                    time.sleep(0.002)
        finally:
            self.published.set()

    def _receive(self) -> None:
        from shardmq.client import ShardMQError

        while True:
            try:
                msg = self.sub.receive(timeout=0.2)
            except ShardMQError as exc:
                if exc.code == "interrupted":
                    self.interrupted += 1
                continue
            except TimeoutError:
                continue
            if msg is not None:
                self.received.add(msg.payload)
                continue
            if self.published.is_set():
                with self.lock:
                    done = self.acked <= self.received
                if done or time.monotonic() > self.drain_deadline:
                    return

    def finish(self, drain: float = 10.0) -> None:
        """Stop publishing; wait up to ``drain`` seconds for the subscriber to get every acknowledged publish."""
        self.drain_deadline = time.monotonic() + drain
        self.stop.set()
        self.threads[0].join(timeout=15)
        self.threads[1].join(timeout=drain + 5)
        self.sub.close()

    @property
    def lost(self) -> set[bytes]:
        return self.acked - self.received


def _answer(sock: Any) -> int:
    """Read the node's answers to the fuzzing client: count its ERRORs (each a refusal the node must have counted)
    and acknowledge QoS 1 messages, so a fuzzed SUB to "#" does not fill a backlog the pair's publishes need."""
    import zmq

    from shardmq.router import codec

    errors = 0
    while sock.poll(0):
        parts = sock.recv_multipart()
        errors += parts[0] == codec.ERROR
        try:
            frame = codec.decode(parts, max_payload=1 << 30)
        except codec.ProtocolError:
            continue
        if frame.type == codec.MSG and type(frame.header.get("mid")) is int:
            mids = [frame.header["mid"]]
        elif frame.type == codec.MSGS:
            mids = [m for item, _ in codec.split_batch(frame) if type(m := item[2]) is int]
        else:
            continue
        if mids:
            with contextlib.suppress(zmq.Again):
                sock.send_multipart(codec.encode(codec.DACK, {"mids": mids}), zmq.NOBLOCK)
    return errors


def _status(endpoint: str, timeout: float = 5.0) -> dict[str, Any] | None:
    """The node's status, or None when it does not answer (a finding: a hung or flooded node)."""
    from shardmq.client import Client, ShardMQError

    try:
        with Client([endpoint], timeout=timeout) as c:
            return c.status()
    except (ShardMQError, TimeoutError):
        return None


def _cpu(pid: int) -> str:
    """What an unresponsive node is doing: its state and CPU use over a second (spinning, or waiting)."""

    def ticks() -> tuple[str, int]:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[11]) + int(fields[12])

    try:
        state, t0 = ticks()
        time.sleep(1.0)
        _, t1 = ticks()
    except OSError:
        return "gone"
    return f"state {state}, {100 * (t1 - t0) / os.sysconf('SC_CLK_TCK'):.0f}% cpu"


@dataclass
class LiveResult:
    report: Report
    alive: dict[str, bool]
    acked: int
    lost: int
    refusals_grew: int
    refusals_expected: int
    internal_errors: int
    counters: dict[str, int]


def fuzz_live(
    seconds: float, seed: int, directory: str | Path | None = None, nodes: int = 3, insecure: bool = False
) -> LiveResult:
    """The live fuzz (see the module docstring); stops everything it started by pid and removes its temp dir.

    On the secure default the made-up peer is a CURVE client with a key of its own: the node's ZAP handler
    refuses every handshake (``security.peer_keys_refused``) and none of its frames reaches a handler, which the
    core fuzz exercises instead. ``insecure`` runs the cluster with ``--insecure``, so its frames are decoded and
    refused as a non-member's (``errors.not_member``)."""
    import zmq

    from shardmq.client.client import use_curve
    from shardmq.client.credentials import resolve as resolve_credentials
    from shardmq.router import codec
    from shardmq.shard.membership import read_members
    from shardmq.testing import LocalCluster, pid_runs

    own_dir = directory is None
    base = Path(directory or tempfile.mkdtemp(prefix="shardmq-fuzz-live-"))
    lc = LocalCluster(base / "cluster", nodes=nodes, log_level="warning", insecure=insecure)
    # A node killed by a signal (a crash in C code) then leaves its Python stack in its log; the nodes inherit
    # our environment, which is put back as it was once they run.
    faulthandler_was = os.environ.get("PYTHONFAULTHANDLER")
    os.environ["PYTHONFAULTHANDLER"] = "1"
    report = Report("live", "random")
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []
    try:
        try:
            lc.up(timeout=90)
            lc.export_credentials()
        finally:
            if faulthandler_was is None:
                os.environ.pop("PYTHONFAULTHANDLER", None)
            else:
                os.environ["PYTHONFAULTHANDLER"] = faulthandler_was
        assert lc.state is not None
        procs = lc.state.nodes
        target = procs[0]
        endpoints = [p.client_endpoint for p in procs]
        first = _status(target.client_endpoint, timeout=15.0)
        if first is None:
            raise RuntimeError(f"node {target.name} did not answer status before fuzzing")
        before = Counter(first["metrics"])
        # The pair's clients sit on the other nodes, but its routes and lookups may well go through the target.
        pair = Pair(endpoints[2:] + endpoints[:1], endpoints[1:2] + endpoints[2:], f"fuzz/pair/{uuid.uuid4().hex[:6]}")
        client = ctx.socket(zmq.DEALER)
        client.setsockopt(zmq.ROUTING_ID, f"fuzz-client-{uuid.uuid4().hex[:6]}".encode())
        # The operator's credentials (exported above; none when insecure): the fuzzer's frames must reach the
        # handlers, and an operator may send every request type (LEAVE aside, see below).
        use_curve(client, resolve_credentials(None))
        peer = ctx.socket(zmq.DEALER)
        peer.setsockopt(zmq.ROUTING_ID, f"fuzz-peer-{uuid.uuid4().hex[:6]}".encode())  # no member has this id
        if not insecure:  # a stranger who speaks CURVE, with the node's real server key and a key of its own
            server_key = read_members(lc.etcd_client(), lc.state.cluster)[1][target.name].curve_key
            public, secret = zmq.curve_keypair()
            peer.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode())
            peer.setsockopt(zmq.CURVE_PUBLICKEY, public)
            peer.setsockopt(zmq.CURVE_SECRETKEY, secret)
        for s, ep in ((client, target.client_endpoint), (peer, target.peer_endpoint)):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 1000)
            s.connect(ep)
            socks.append(s)
        names = [p.name for p in procs] + ["ghost", ""]
        # LEAVE would make the node drain away and exit: that is an operator's request, not a fault to survive
        # (a LEAVE made from another type's header did exactly that in an early run).
        mutator = Mutator(names, never=frozenset({codec.LEAVE}))
        rng = random.Random(seed)
        choices = RandomChoices(rng)
        client_types = sorted(codec.CLIENT_REQUESTS - {codec.LEAVE})
        peer_types = sorted(codec.PEER_REQUESTS)
        sent = Counter[str]()
        client_errors = 0
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            for sock, types, kind in ((client, client_types, "client"), (peer, peer_types, "peer")):
                parts = mutator.frame(choices, types)
                if not parts:
                    parts = [b""]  # zmq sends no empty multipart message
                try:
                    sock.send_multipart(parts, zmq.NOBLOCK)
                    sent[kind] += 1
                except zmq.Again:
                    sent[f"{kind}_hwm"] += 1
            client_errors += _answer(client)
            if sent["client"] % 64 == 0:
                time.sleep(0.001)  # leave the pair (and the machine) some room
        report.execs, report.seconds = sent["client"] + sent["peer"], time.monotonic() - start
        peer_decoded = sent["peer"] if insecure else 0  # refused at the handshake, a stranger's frames never arrive
        # Let the node read what is still queued: every stranger's frame and every ERROR must show in the counters.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.2)
            client_errors += _answer(client)
            now = _status(target.client_endpoint)
            if now is not None and _refusals(now["metrics"]) - _refusals(before) >= peer_decoded + client_errors:
                break
        pair.finish()
        alive = {p.name: pid_runs(p) for p in procs}
        last = _status(target.client_endpoint) if alive[target.name] else None
        if last is None and alive[target.name]:
            report.findings.append(f"node {target.name} runs but does not answer ({_cpu(target.pid)}; logs: "
                                   f"{lc.dir}/logs)")  # fmt: skip
        after = Counter(last["metrics"] if last else {})
        grew = _refusals(after) - _refusals(before)
        expected = peer_decoded + client_errors
        internal = after["errors.internal"] - before["errors.internal"]
        counters = {k: after[k] - before[k] for k in sorted(after) if k.startswith(REFUSAL_PREFIXES)
                    and after[k] != before[k]}  # fmt: skip
        report.extra.update(
            frames_sent=dict(sent), client_errors_received=client_errors, pair_acked=len(pair.acked),
            pair_received=len(pair.received & pair.acked), pair_publish_failures=dict(pair.publish_failures),
            pair_interruptions=pair.interrupted, nodes_alive=alive, refusals_counted=grew,
            refusals_at_least=expected, errors_internal=internal, refusal_counters=counters,
        )  # fmt: skip
        if not all(alive.values()):
            report.findings.append(f"node(s) died: {[n for n, ok in alive.items() if not ok]} (logs: {lc.dir}/logs)")
        if pair.lost:
            report.findings.append(f"{len(pair.lost)} acknowledged publish(es) never received, e.g. "
                                   f"{sorted(pair.lost)[:3]}")  # fmt: skip
        if grew < expected:
            report.findings.append(f"refusals not counted: {grew} counted, at least {expected} refused")
        if internal:
            report.findings.append(f"errors.internal grew by {internal}: a handler raised (see {lc.dir}/logs)")
        return LiveResult(report, alive, len(pair.acked), len(pair.lost), grew, expected, internal, counters)
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()
        lc.down()
        if own_dir and not os.environ.get("SHARDMQ_FUZZ_KEEP"):
            shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- main
def has_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shardmq.loadtest.fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--target", choices=["codec", "core", "live"], default="core")
    ap.add_argument("--seed", type=int, default=0, help="0: a random seed (printed)")
    ap.add_argument("--engine", choices=["auto", "atheris", "random"], default="auto",
                    help="codec/core: atheris when installed (auto), or the random loop")  # fmt: skip
    ap.add_argument("--json", action="store_true", help="print the report as JSON too")
    ap.add_argument("--insecure", action="store_true",
                    help="live: a cluster without peer security, so the stranger's peer frames reach the handlers")
    ap.add_argument("--replay", type=int, help="run the random engine's input with this key once (from a report)")
    ap.add_argument("--replay-file", help="run an atheris crash file once")
    ap.add_argument("--atheris-child", choices=["codec", "core"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.atheris_child:
        atheris_child(args.atheris_child, int(args.seconds), args.seed, args.workdir)
        return 0
    if args.replay is not None or args.replay_file:
        return replay(args.target, args.replay, args.replay_file)
    seed = args.seed or random.SystemRandom().randint(1, 2**31 - 1)
    print(f"seed {seed}", flush=True)
    if args.target == "live":
        report = fuzz_live(args.seconds, seed, insecure=args.insecure).report
    elif args.engine == "atheris" or (args.engine == "auto" and has_atheris()):
        report = fuzz_atheris(args.target, max(1, int(args.seconds)), seed)
    else:
        report = fuzz_random(args.target, args.seconds, seed)
    print(report.render())
    if args.json:
        print(json.dumps({"target": report.target, "engine": report.engine, "execs": report.execs,
                          "seconds": report.seconds, "execs_per_s": report.rate, "findings": report.findings,
                          **report.extra}, default=str))  # fmt: skip
    return 1 if report.findings else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
