"""Benchmarks: this daemon beside the original `qwen serve` 0.24.4, in one run; printed, never asserted.

    nox -s bench [-- --quick] [-- --json PATH] [-- --repetitions N]
    python tests/bench/bench.py [...]           (with the package and its [test] extras installed)

Each repetition runs, in this order (so the two daemons alternate A, B, A, B…):

  1. this daemon (`python -m serve run`, default settings) and 2. the original (`cli-entry.js serve`, the
     npm package's `qwen` bin, default settings), each in a scratch HOME and workspace on a free
     loopback port, with the bearer token in QWEN_SERVER_TOKEN: spawn → first 200 on `GET /capabilities`
     (with the token); idle RSS once the process tree is steady (the original preheats one agent child,
     whose memory is summed in); `wrk -t2 -c50 -d10s --latency` on `GET /workspace/auth/status` (req/s,
     p50, p99, and the server's utime + stime over the run per request, summed over its process tree); then,
     1 s after the load, SIGTERM → exit;
  3. the stack's ceiling: a bare hypercorn-trio ASGI app and a bare quart-trio app (tests/bench/ceiling.py)
     serving this daemon's status body, under the same wrk run;
  4. this daemon alone with N WebSocket subscribers (tests/bench/subscribers.py);
  5. this daemon alone: status with ≈5,800 finished flows retained vs none (tests/bench/history.py);
  6. this daemon alone: SIGTERM while a peer pipelines requests and never reads.

Every figure is the median (min–max) over all its samples; a ratio is taken per repetition (ours / the
original's) and then summarized the same way. /proc/loadavg is read before, after each repetition and at
the end, with the share of all CPUs busy in between (/proc/stat): the machine is shared, so read the
figures beside it. The daemon's sources are byte-compiled first, as a pip install leaves them.

Exit status: 0 when every figure was measured and every check held; 1 when anything could not be measured
(the original did not start, say) or a check failed (the figures that were measured are still printed);
2 when wrk is missing and cannot be installed here.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # run as a script: tests/ holds the `bench` and `support` packages
    sys.path.insert(0, str(TESTS))

import trio  # noqa: E402

from bench import history, servers, subscribers, wrk  # noqa: E402
from bench.processes import ServerSpec, StartFailed, http_get, start  # noqa: E402
from bench.report import (  # noqa: E402
    FACTOR,
    KIBIBYTES,
    MEGABYTES,
    MILLIS,
    PER_SECOND,
    SECONDS,
    Unit,
    cell,
    paired_ratios,
    summarize,
    table,
)

OURS, ORIGINAL, BARE_HYPERCORN, BARE_QUART = "qwen-serve", "original", "bare-hypercorn", "bare-quart"
DEFAULT_JSON = servers.REPO / ".nox" / "bench-results.json"
QUIET_AFTER_LOAD_S = 1.0
ALONE = ("subscribers", "history", "stalled")


@dataclass(frozen=True, slots=True)
class Settings:
    repetitions: int
    wrk_threads: int
    wrk_connections: int
    wrk_duration_s: int
    subscribers: int
    idle_posts: int
    busy_posts: int
    grants: int
    retained_flows: int
    history_wrk_duration_s: int


FULL = Settings(3, 2, 50, 10, 1000, 20, 5, 3, 5800, 4)
QUICK = Settings(1, 2, 50, 3, 100, 5, 2, 1, 300, 2)


@dataclass
class Run:
    settings: Settings
    command: str
    started: str
    side: dict[str, list[dict[str, Any] | None]] = field(default_factory=dict)
    alone: dict[str, list[dict[str, Any] | None]] = field(default_factory=dict)
    loadavg: list[tuple[str, str]] = field(default_factory=list)
    _cpu_mark: tuple[int, int] | None = None
    not_measured: list[str] = field(default_factory=list)
    checks_failed: list[str] = field(default_factory=list)
    status_body: bytes | None = None

    def note_load(self, when: str) -> None:
        """/proc/loadavg now, and how busy all CPUs were (from /proc/stat) since the last note."""
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        busy, total = cpu_ticks()
        if self._cpu_mark is not None and total > self._cpu_mark[1]:
            share = (busy - self._cpu_mark[0]) / (total - self._cpu_mark[1])
            load += f"; all CPUs {share:.0%} busy since the last line"
        self._cpu_mark = (busy, total)
        self.loadavg.append((when, load))

    @contextlib.contextmanager
    def attempt(self, what: str) -> Iterator[None]:
        """Run one measurement; a failure is recorded (and printed) instead of ending the run."""
        try:
            yield
        except Exception as exc:  # the boundary of one measurement: the others still run
            detail = str(exc) if isinstance(exc, StartFailed) else f"{type(exc).__name__}: {exc}"
            self.not_measured.append(f"{what}: {detail}")
            progress(f"  FAILED {what}: {detail}")
            if not isinstance(exc, StartFailed):
                traceback.print_exc(file=sys.stderr)


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs, from the first line of /proc/stat (idle and iowait are not busy)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(fields[:8])  # guest time is already inside user and nice
    return total - fields[3] - fields[4], total


_STARTED = time.perf_counter()


def seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} s"


def progress(message: str) -> None:
    print(f"{time.perf_counter() - _STARTED:6.1f} s  {message}", file=sys.stderr, flush=True)


def load_figures(load: wrk.Load) -> dict[str, Any]:
    return {
        "status_rps": load.rps,
        "status_p50_s": load.p50_s,
        "status_p99_s": load.p99_s,
        "status_cpu_per_request_s": load.cpu_per_request_s,
        "status_requests": load.requests,
        "status_non_2xx": load.non_2xx,
        "status_socket_errors": load.socket_errors,
    }


def check_load(run: Run, who: str, load: wrk.Load) -> None:
    if load.non_2xx:
        run.checks_failed.append(f"{who}: wrk saw {load.non_2xx} non-2xx answers on status (its figures are suspect)")
    if load.socket_errors:
        run.checks_failed.append(f"{who}: wrk saw socket errors on status: {load.socket_errors}")


def measure_daemon(run: Run, spec: ServerSpec) -> dict[str, Any]:
    """Cold start, idle RSS, the status load, idle SIGTERM → exit, for one daemon."""
    s = run.settings
    with start(spec) as server:
        figures: dict[str, Any] = {"cold_start_s": server.ready_s}
        idle = server.settle()
        figures.update(
            idle_rss_bytes=idle.rss_bytes,
            idle_processes=idle.processes,
            idle_settled_after_s=idle.settled_after_s,
        )
        if not idle.settled:
            run.checks_failed.append(
                f"{spec.name}: its idle memory never settled ({idle.processes} processes after {idle.settled_after_s:.0f} s)"
            )
        status, body, _ = http_get(server.port, servers.STATUS_PATH, spec.token)
        if status != 200:
            raise RuntimeError(f"GET {servers.STATUS_PATH} answered {status}")
        if spec.name == OURS and run.status_body is None:
            run.status_body = body
        load = wrk.load(
            server,
            servers.STATUS_PATH,
            threads=s.wrk_threads,
            connections=s.wrk_connections,
            duration_s=s.wrk_duration_s,
        )
        figures.update(load_figures(load))
        check_load(run, spec.name, load)
        time.sleep(QUIET_AFTER_LOAD_S)
        stopped = server.stop()
        figures.update(
            sigterm_idle_exit_s=stopped.exit_s,
            sigterm_idle_tree_gone_s=stopped.tree_gone_s,
            sigterm_idle_returncode=stopped.returncode,
        )
        if stopped.leftovers:
            run.checks_failed.append(f"{spec.name}: {stopped.leftovers} processes still there 30 s after SIGTERM")
    return figures


def measure_ceiling(run: Run, spec: ServerSpec) -> dict[str, Any]:
    s = run.settings
    with start(spec) as server:
        time.sleep(0.2)
        load = wrk.load(
            server,
            servers.STATUS_PATH,
            threads=s.wrk_threads,
            connections=s.wrk_connections,
            duration_s=s.wrk_duration_s,
        )
        check_load(run, spec.name, load)
        return load_figures(load)


def measure_stalled_peer() -> dict[str, Any]:
    """SIGTERM while a client pipelines requests and never reads (SPEC §3: exit within 1 s all the same)."""
    with start(servers.ours()) as server:
        peer = socket.create_connection(("127.0.0.1", server.port))
        try:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            peer.settimeout(1)
            burst = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode() * 20_000
            with contextlib.suppress(TimeoutError):
                peer.sendall(burst)  # the server stops reading once its own writes block
            time.sleep(0.5)  # let it work through what it read, until its writes are stuck
            stopped = server.stop()
        finally:
            peer.close()
    return {"sigterm_stalled_peer_exit_s": stopped.exit_s, "sigterm_stalled_peer_returncode": stopped.returncode}


def repetition(run: Run, r: int, original_problem: str | None) -> None:
    s = run.settings
    for name in (OURS, ORIGINAL, BARE_HYPERCORN, BARE_QUART):
        run.side.setdefault(name, []).append(None)
    for name in ALONE:
        run.alone.setdefault(name, []).append(None)

    def record(table: dict[str, list[dict[str, Any] | None]], name: str, figures: dict[str, Any]) -> None:
        table[name][r] = figures

    tag = f"[{r + 1}/{s.repetitions}]"
    progress(f"{tag} {OURS}: start, idle, wrk, SIGTERM")
    with run.attempt(f"{OURS} (repetition {r + 1})"):
        record(run.side, OURS, measure_daemon(run, servers.ours()))
    if original_problem is None:
        progress(f"{tag} {ORIGINAL}: start, idle, wrk, SIGTERM")
        with run.attempt(f"{ORIGINAL} (repetition {r + 1})"):
            record(run.side, ORIGINAL, measure_daemon(run, servers.original()))
    for name, kind in ((BARE_HYPERCORN, "hypercorn"), (BARE_QUART, "quart")):
        if run.status_body is None:
            continue  # this daemon never answered: there is no body to serve
        progress(f"{tag} {name}: wrk")
        with run.attempt(f"{name} (repetition {r + 1})"):
            record(run.side, name, measure_ceiling(run, servers.ceiling(kind, run.status_body)))
    progress(f"{tag} {OURS} alone: {s.subscribers} WebSocket subscribers")
    with run.attempt(f"{OURS} with {s.subscribers} subscribers (repetition {r + 1})"):
        plan = subscribers.Plan(s.subscribers, s.idle_posts, s.busy_posts, s.grants)
        figures = trio.run(subscribers.run, plan)
        record(run.alone, "subscribers", figures)
        if figures["subscribers_cancelled_and_1001"] != s.subscribers:
            codes = ", ".join(f"{code} ×{count}" for code, count in sorted(figures["close_codes"].items()))
            run.checks_failed.append(
                f"repetition {r + 1}: SIGTERM with {s.subscribers} subscribers: "
                f"{figures['subscribers_cancelled_and_1001']} got all 4 `cancelled` events and then a 1001 close "
                f"({figures['subscribers_all_cancelled']} got the 4 events, {figures['subscribers_closed_1001']} "
                f"a 1001; close codes: {codes}; after the SIGTERM the last `cancelled` arrived at "
                f"{seconds(figures['sigterm_to_last_cancelled_s'])}, the closes between "
                f"{seconds(figures['sigterm_to_first_close_s'])} and {seconds(figures['sigterm_to_last_close_s'])}, "
                f"the exit at {seconds(figures['sigterm_busy_exit_s'])})"
            )
        if figures["sigterm_busy_returncode"] != 0:
            run.checks_failed.append(
                f"repetition {r + 1}: exit code {figures['sigterm_busy_returncode']} after SIGTERM"
            )
    progress(f"{tag} {OURS} alone: status with {s.retained_flows} finished flows retained vs none")
    with run.attempt(f"{OURS} with {s.retained_flows} retained flows (repetition {r + 1})"):
        result = trio.run(
            partial(
                history.run,
                s.retained_flows,
                threads=s.wrk_threads,
                connections=s.wrk_connections,
                duration_s=s.history_wrk_duration_s,
            )
        )
        for key in ("status_empty", "status_retained"):
            check_load(run, f"{OURS} ({key})", result[key])
        record(
            run.alone,
            "history",
            {**result, **{k: dataclasses.asdict(result[k]) for k in ("status_empty", "status_retained")}},
        )
    progress(f"{tag} {OURS} alone: SIGTERM with a peer that pipelines and never reads")
    with run.attempt(f"{OURS} SIGTERM with a stalled peer (repetition {r + 1})"):
        record(run.alone, "stalled", measure_stalled_peer())
    run.note_load(f"after repetition {r + 1}")


# --- the tables ------------------------------------------------------------------------------------------------


def samples(reps: list[dict[str, Any] | None], key: str | Callable[[dict[str, Any]], Any]) -> list[float | None]:
    out: list[float | None] = []
    for rep in reps:
        if rep is None:
            out.append(None)
            continue
        value = key(rep) if callable(key) else rep.get(key)
        out.append(float(value) if value is not None else None)
    return out


def pooled(reps: list[dict[str, Any] | None], key: str) -> list[float | None]:
    return [float(v) for rep in reps if rep is not None for v in rep.get(key, [])]


def side_by_side_table(run: Run, original_missing: str) -> str:
    s = run.settings
    wrk_run = f"wrk -t{s.wrk_threads} -c{s.wrk_connections} -d{s.wrk_duration_s}s"
    rows_spec: list[tuple[str, str, Unit]] = [
        ("cold_start_s", "cold start: spawn → first 200 on `GET /capabilities` (with the token)", SECONDS),
        ("idle_rss_bytes", "idle RSS (the original: daemon + its child, summed from /proc)", MEGABYTES),
        ("status_rps", f"`GET /workspace/auth/status`, {wrk_run}: req/s", PER_SECOND),
        ("status_p50_s", "… latency p50", MILLIS),
        ("status_p99_s", "… latency p99", MILLIS),
        ("status_cpu_per_request_s", "… server CPU per request (utime+stime; the original: its process tree)", MILLIS),
        ("sigterm_idle_exit_s", "idle SIGTERM → exit", SECONDS),
        ("sigterm_idle_tree_gone_s", "idle SIGTERM → last process of the tree gone", SECONDS),
    ]
    ours, theirs = run.side.get(OURS, []), run.side.get(ORIGINAL, [])
    rows = []
    for key, label, unit in rows_spec:
        a, b = samples(ours, key), samples(theirs, key)
        rows.append(
            [
                label,
                cell(summarize(a), unit),
                cell(summarize(b), unit, why_missing=original_missing),
                cell(summarize(paired_ratios(a, b)), FACTOR, why_missing="—"),
            ]
        )
    return table(["figure", "qwen-serve (ours)", "original `qwen serve` 0.24.4", "ours / original"], rows)


def ceiling_table(run: Run, original_missing: str) -> str:
    apps = [
        (BARE_HYPERCORN, "bare hypercorn-trio ASGI app (stock `hypercorn.trio.serve`)"),
        (BARE_QUART, "bare quart-trio app, one route, on the same"),
        (OURS, "qwen-serve (ours)"),
        (ORIGINAL, "original `qwen serve` 0.24.4"),
    ]
    ours_rps = samples(run.side.get(OURS, []), "status_rps")
    theirs_rps = samples(run.side.get(ORIGINAL, []), "status_rps")
    rows = []
    for name, label in apps:
        reps = run.side.get(name, [])
        missing = original_missing if name == ORIGINAL else "not measured"
        rps = samples(reps, "status_rps")
        rows.append(
            [
                label,
                cell(summarize(rps), PER_SECOND, why_missing=missing),
                cell(summarize(samples(reps, "status_p99_s")), MILLIS, why_missing="—"),
                cell(summarize(samples(reps, "status_cpu_per_request_s")), MILLIS, why_missing="—"),
                cell(summarize(paired_ratios(rps, ours_rps)), FACTOR, why_missing="—"),
                cell(summarize(paired_ratios(rps, theirs_rps)), FACTOR, why_missing="—"),
            ]
        )
    return table(
        [
            "serving the same status body",
            "req/s",
            "p99",
            "server CPU per request",
            "req/s ÷ ours",
            "req/s ÷ original's",
        ],
        rows,
    )


def alone_table(run: Run) -> str:
    s = run.settings
    subs = run.alone.get("subscribers", [])
    hist = run.alone.get("history", [])
    n = s.subscribers
    idle_p50 = samples(subs, lambda rep: median_or_none(rep["post_latency_idle_s"]))
    busy_p50 = samples(subs, lambda rep: median_or_none(rep["post_latency_busy_s"]))
    clean = [rep["subscribers_cancelled_and_1001"] for rep in subs if rep is not None]
    flows = s.retained_flows
    empty_rps = samples(hist, lambda rep: rep["status_empty"]["rps"])
    retained_rps = samples(hist, lambda rep: rep["status_retained"]["rps"])
    hist_wrk = f"wrk -t{s.wrk_threads} -c{s.wrk_connections} -d{s.history_wrk_duration_s}s"
    rows = [
        [
            f"one event to all of {n:,} WebSocket subscribers: POST sent → the last one's `auth_device_flow_started`",
            cell(summarize(pooled(subs, "fanout_started_s")), MILLIS),
            "≤ 250 ms",
        ],
        [
            f"the same for a DELETE → the last of {n:,} subscribers' `auth_device_flow_cancelled`",
            cell(summarize(pooled(subs, "fanout_cancelled_s")), MILLIS),
            "",
        ],
        [
            "the triggering POST's latency (to its 201; sent by a process of its own), 0 subscribers: p50 (min–max over all POSTs)",
            cell(summarize(pooled(subs, "post_latency_idle_s")), MILLIS),
            "",
        ],
        [
            f"the same with {n:,} subscribers",
            cell(summarize(pooled(subs, "post_latency_busy_s")), MILLIS),
            "",
        ],
        [
            f"… p50 with {n:,} / p50 with 0 (per repetition)",
            cell(summarize(paired_ratios(busy_p50, idle_p50)), FACTOR),
            "≤ 2×",
        ],
        [
            f"IdP grant (its token reply) → `authorized` at the last of {n:,} subscribers",
            cell(summarize(pooled(subs, "grant_to_last_s")), MILLIS),
            "≤ 100 ms",
        ],
        [
            f"memory per idle subscriber (RSS delta / {n:,})",
            cell(summarize(samples(subs, "rss_per_subscriber_bytes")), KIBIBYTES),
            "≤ 40 KiB",
        ],
        [
            f"SIGTERM with 4 pending flows and {n:,} subscribers → exit",
            cell(summarize(samples(subs, "sigterm_busy_exit_s")), SECONDS),
            "≤ 1 s",
        ],
        [
            "… subscribers that got all 4 `cancelled` events, then a 1001 close",
            (" / ".join(f"{c:,}" for c in clean) + f" of {n:,}") if clean else "not measured",
            "all",
        ],
        [
            "SIGTERM while a peer pipelines 20,000 GETs and never reads → exit",
            cell(summarize(samples(run.alone.get("stalled", []), "sigterm_stalled_peer_exit_s")), SECONDS),
            "≤ 1 s (SPEC §3)",
        ],
        [
            f"`GET /workspace/auth/status`, {hist_wrk}, no finished flow retained: req/s",
            cell(summarize(empty_rps), PER_SECOND),
            "",
        ],
        [
            f"the same with {flows:,} finished flows retained",
            cell(summarize(retained_rps), PER_SECOND),
            "",
        ],
        [
            "… wall time per login started and cancelled while filling (4 at a time): first tenth → last tenth",
            cell(summarize(samples(hist, "fill_s_per_flow_first_tenth")), MILLIS)
            + " → "
            + cell(summarize(samples(hist, "fill_s_per_flow_last_tenth")), MILLIS),
            "",
        ],
        [
            f"… {flows:,} retained / none (per repetition)",
            cell(summarize(paired_ratios(retained_rps, empty_rps)), FACTOR),
            "≈ 1",
        ],
    ]
    return table(["figure (this daemon alone)", "qwen-serve (ours)", "target (issue 13)"], rows)


def median_or_none(values: list[float]) -> float | None:
    summary = summarize(values)
    return summary.median if summary else None


ALONE_WHY = """\
The original has no equivalent for the second table, or cannot be driven the same way here:
- it has no workspace-level event stream: its device-flow events go only to per-session SSE streams
  (`GET /session/:id/events`, where each session is a `qwen --acp` agent child process, 32 at most by
  default), so 1,000 subscribers of one stream cannot exist there;
- its qwen-oauth IdP is fixed at https://chat.qwen.ai (a constant in its bundle, no setting or variable),
  which this closed machine cannot reach, so no login starts there: no grant, no pending flow at SIGTERM,
  no retained history."""


# --- the run ---------------------------------------------------------------------------------------------------


def raise_file_limit() -> int:
    """1,000 WebSocket subscribers in this process need more descriptors than the usual soft limit of 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65_536)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {
        "qwen-serve": version("qwen-serve"),
        "original": servers.ORIGINAL_VERSION,
        "python": platform.python_version(),
        "node": servers.node_version(),
        "wrk": wrk.wrk_version(),
        **{name: version(name) for name in ("trio", "hypercorn", "quart", "quart-trio", "trio-websocket")},
    }


def how_started() -> list[str]:
    env = "HOME=$SCRATCH/home QWEN_HOME=$SCRATCH/home/.qwen QWEN_SERVER_TOKEN=<token>"
    # Joined without quoting: the placeholders are not shell words to run, and no part holds a space.
    ours = " ".join(servers.ours_argv("PORT", "$SCRATCH/workspace")).replace(sys.executable, "python")
    original = " ".join(servers.original_argv("PORT", "$SCRATCH/workspace"))
    original = original.replace(str(servers.REPO) + "/", "").replace(shutil.which("node") or "node", "node")
    return [
        f"ours:     cd $SCRATCH/workspace && {env} {ours}",
        f"original: cd $SCRATCH/workspace && {env} {original}",
        "(PORT: a free loopback port picked just before; $SCRATCH: a fresh temp dir per start)",
    ]


def print_report(run: Run, original_problem: str | None, elapsed_s: float, json_path: Path) -> None:
    original_missing = "not measured (see below)" if original_problem else "not measured"
    s = run.settings
    cpus = os.cpu_count()
    print()
    print(f"$ {run.command}")
    print(
        f"{run.started}, {s.repetitions} repetition(s) interleaved (ours, original, ceilings, ours alone), "
        f"{elapsed_s:.0f} s in all; {cpus} CPUs ({platform.machine()}, {platform.release()})"
    )
    for when, load in run.loadavg:
        print(f"  load average {when}: {load}")
    for line in how_started():
        print(f"  {line}")
    print("  " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    print()
    print(side_by_side_table(run, original_missing))
    print()
    print("The stack's ceiling (each app in its own process; the same wrk run; ratios per repetition):")
    print()
    print(ceiling_table(run, original_missing))
    print()
    print(alone_table(run))
    print()
    print(ALONE_WHY)
    if original_problem:
        print(f"\nThe original could not be started here: {original_problem}")
    if run.not_measured:
        print("\nNot measured:")
        for line in run.not_measured:
            print(f"- {line}")
    if run.checks_failed:
        print("\nChecks that failed:")
        for line in run.checks_failed:
            print(f"- {line}")
    print(f"\nJSON: {json_path}")


def write_json(run: Run, original_problem: str | None, elapsed_s: float, path: Path) -> None:
    document = {
        "command": run.command,
        "started": run.started,
        "elapsed_s": elapsed_s,
        "settings": dataclasses.asdict(run.settings),
        "machine": {"cpus": os.cpu_count(), "machine": platform.machine(), "kernel": platform.release()},
        "loadavg": [{"when": when, "loadavg": load} for when, load in run.loadavg],
        "versions": versions(),
        "how_started": how_started(),
        "original_problem": original_problem,
        "side_by_side": run.side,
        "ours_alone": run.alone,
        "not_measured": run.not_measured,
        "checks_failed": run.checks_failed,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one repetition, short loads, 100 subscribers")
    parser.add_argument("--repetitions", type=int, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write the figures ({DEFAULT_JSON})")
    parser.add_argument("--command", default=None, help=argparse.SUPPRESS)  # what to print as the command
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    if args.repetitions:
        settings = dataclasses.replace(settings, repetitions=args.repetitions)

    if wrk.wrk_path() is None:
        print(f"qwen-serve bench: {wrk.INSTALL_HINT}", file=sys.stderr)
        return 2
    raise_file_limit()
    # What a pip-installed daemon starts from: compiled bytecode (this environment sets
    # PYTHONDONTWRITEBYTECODE=1, and an editable install's sources are otherwise recompiled at every start).
    compileall.compile_dir(servers.REPO / "serve", quiet=1)

    command = args.command or shlex.join([Path(sys.executable).name, *sys.argv])
    run = Run(settings, command, datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    original_problem = servers.original_problem()
    if original_problem:
        progress(f"the original cannot be started: {original_problem}")
    run.note_load("before")
    t0 = time.perf_counter()
    for r in range(settings.repetitions):
        repetition(run, r, original_problem)
    elapsed = time.perf_counter() - t0
    run.note_load("at the end")
    write_json(run, original_problem, elapsed, args.json)
    print_report(run, original_problem, elapsed, args.json)
    return 1 if original_problem or run.not_measured or run.checks_failed else 0


if __name__ == "__main__":
    sys.exit(main())
