"""The servers under measurement as processes: start one on a free loopback port, read its process tree's
memory and CPU time from /proc, stop it with SIGTERM and time the exit.

Every server runs in a scratch directory of its own (HOME, QWEN_HOME, workspace, its stdout and stderr as
files), in a session of its own, so that whatever it leaves behind can be ended by its group id.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
READY_TIMEOUT_S = 60.0
READY_POLL_S = 0.005
STOP_TIMEOUT_S = 30.0


class StartFailed(Exception):
    """A server did not answer 200 on its ready path: the message says why (exit code, stderr's tail)."""


@dataclass(frozen=True, slots=True)
class Launch:
    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: Path


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """How to start one kind of server. `launch(port, scratch)` builds its command line and environment."""

    name: str
    launch: Callable[[int, Path], Launch]
    ready_path: str
    token: str
    # Processes the server is expected to have started once idle (the original preheats one agent child).
    expect_children: int = 0


@dataclass(frozen=True, slots=True)
class Idle:
    rss_bytes: int
    processes: int
    settled_after_s: float
    settled: bool


@dataclass(frozen=True, slots=True)
class Stopped:
    exit_s: float  # SIGTERM to the server's own process exiting
    tree_gone_s: float  # SIGTERM to the last process of its tree gone
    returncode: int
    leftovers: int  # processes of the tree still there after STOP_TIMEOUT_S (then killed)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(port: int, path: str, token: str | None, timeout: float = 5.0) -> tuple[int, bytes, str]:
    """One GET on a fresh connection: (status, body, content type)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = conn.getresponse()
        return response.status, response.read(), response.getheader("content-type", "")
    finally:
        conn.close()


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces): field 3 (state) is index 0."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw.rsplit(")", 1)[1].split()


def process_tree(root: int) -> list[int]:
    """`root` and every descendant alive now (root first; empty if `root` is gone)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    if _stat_fields(root) is None:
        return []
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def rss_bytes(pids: Sequence[int]) -> int:
    """Resident memory summed over `pids` (/proc/PID/statm; shared pages count once per process)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
    return total


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time summed over `pids` (utime + stime, fields 14 and 15 of /proc/PID/stat)."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


class RunningServer:
    def __init__(self, spec: ServerSpec, proc: subprocess.Popen[bytes], port: int, scratch: Path, ready_s: float):
        self.spec = spec
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.scratch = scratch
        self.ready_s = ready_s  # spawn → first 200 on the ready path

    def tree(self) -> list[int]:
        return process_tree(self.proc.pid)

    def rss_bytes(self) -> int:
        return rss_bytes(self.tree())

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.tree())

    def stderr_tail(self, lines: int = 15) -> str:
        path = self.scratch / "stderr.log"
        text = path.read_text(errors="replace") if path.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def settle(self, *, min_s: float = 1.0, window_s: float = 1.0, max_s: float = 20.0) -> Idle:
        """Wait until the tree has its expected processes and its RSS moved < 2 % over `window_s`."""
        t0 = time.perf_counter()
        samples: list[tuple[float, tuple[int, ...], int]] = []
        while True:
            now = time.perf_counter() - t0
            pids = tuple(sorted(self.tree()))
            samples.append((now, pids, rss_bytes(pids)))
            recent = [s for s in samples if s[0] >= now - window_s]
            stable = (
                now >= min_s
                and samples[0][0] <= now - window_s
                and len({s[1] for s in recent}) == 1
                and len(pids) >= 1 + self.spec.expect_children
                and max(s[2] for s in recent) <= 1.02 * min(s[2] for s in recent)
            )
            if stable or now >= max_s:
                return Idle(rss_bytes=samples[-1][2], processes=len(pids), settled_after_s=now, settled=stable)
            time.sleep(0.25)

    def stop(self) -> Stopped:
        """SIGTERM to the server's own process (as a service manager sends it); time its exit and its tree's."""
        tree = self.tree()
        t0 = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        returncode = self.proc.wait(STOP_TIMEOUT_S)
        exit_s = time.perf_counter() - t0
        while any(_alive(pid) for pid in tree) and time.perf_counter() - t0 < STOP_TIMEOUT_S:
            time.sleep(0.002)
        tree_gone_s = time.perf_counter() - t0
        leftovers = [pid for pid in tree if _alive(pid)]
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return Stopped(exit_s=exit_s, tree_gone_s=tree_gone_s, returncode=returncode, leftovers=len(leftovers))


def _wait_ready(proc: subprocess.Popen[bytes], spec: ServerSpec, port: int, t0: float) -> float:
    """Seconds from `t0` (the spawn) to the first 200 on the spec's ready path."""
    last = "no answer"
    while time.perf_counter() - t0 < READY_TIMEOUT_S:
        if proc.poll() is not None:
            raise StartFailed(f"exited with code {proc.returncode} before answering ({last})")
        try:
            status, _, _ = http_get(port, spec.ready_path, spec.token, timeout=2.0)
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if status == 200:
                return time.perf_counter() - t0
            last = f"HTTP {status}"
        time.sleep(READY_POLL_S)
    raise StartFailed(f"no 200 on {spec.ready_path} within {READY_TIMEOUT_S:.0f} s ({last})")


@contextlib.contextmanager
def start(spec: ServerSpec) -> Iterator[RunningServer]:
    """Spawn `spec` on a free loopback port and wait for its first 200; end whatever is left on exit."""
    scratch = Path(tempfile.mkdtemp(prefix=f"qwen-bench-{spec.name}-"))
    port = free_port()
    launch = spec.launch(port, scratch)
    with (scratch / "stdout.log").open("wb") as out, (scratch / "stderr.log").open("wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            list(launch.argv),
            cwd=launch.cwd,
            env=dict(launch.env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    try:
        try:
            ready_s = _wait_ready(proc, spec, port, t0)
        except StartFailed as exc:
            tail = (scratch / "stderr.log").read_text(errors="replace").strip().splitlines()[-15:]
            raise StartFailed(f"{spec.name}: {exc}" + ("\n  stderr: " + "\n  ".join(tail) if tail else "")) from None
        yield RunningServer(spec, proc, port, scratch, ready_s)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the session we created for it: its group id is its pid
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        shutil.rmtree(scratch, ignore_errors=True)


def scratch_dirs(scratch: Path) -> tuple[Path, Path]:
    """(home, workspace) inside `scratch`, created."""
    home, workspace = scratch / "home", scratch / "workspace"
    home.mkdir()
    workspace.mkdir()
    return home, workspace


def base_env(home: Path) -> dict[str, str]:
    """The bench's environment with a scratch HOME and QWEN_HOME, and no proxy (loopback only)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
        and not key.startswith(("QWEN_", "NODE_OPTIONS"))
    }
    env.update(HOME=str(home), QWEN_HOME=str(home / ".qwen"), NO_PROXY="127.0.0.1,localhost")
    return env
