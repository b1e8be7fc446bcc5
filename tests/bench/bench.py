"""Benchmarks: figures and ratios against the original `qwen serve` 0.24.4, printed, never asserted.

    nox -s bench            (or: python tests/bench/bench.py [--quick])

Each figure is measured on a real daemon started as `python -m serve run --port 0`, the way a user runs it,
on loopback only, with bounded loops. The original's figures were measured on this kind of machine (2 vCPU)
and are copied here so the project stands alone:
cold start 1.3–1.9 s, idle RSS ≈171 MB (+≈175 MB for its child process),
`GET /workspace/auth/status` ≈1,677 req/s with p99 ≈286 ms (wrk -t2 -c50 -d10s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypedDict

import httpx
import trio
import trio_websocket

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from support.fake_idp import FakeIdP  # noqa: E402
from support.idp_server import serve_idp  # noqa: E402


class Original(TypedDict):
    """The original's figures (module docstring): cold start as a (best, worst) range."""

    cold_start_s: tuple[float, float]
    idle_rss_mb: float
    status_rps: float
    status_p99_ms: float


TOKEN = "bench-token-0123456789"
ORIGINAL: Original = {"cold_start_s": (1.3, 1.9), "idle_rss_mb": 171.0, "status_rps": 1677.0, "status_p99_ms": 286.0}
LISTENING = re.compile(r"qwen-serve listening on (\S+) ")


class Daemon:
    def __init__(self, proc: subprocess.Popen[str], url: str, started_in_s: float) -> None:
        self.proc = proc
        self.url = url
        self.started_in_s = started_in_s

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self, timeout: float = 30.0) -> float:
        """SIGTERM; seconds until the process exited."""
        t0 = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        return time.perf_counter() - t0


@contextmanager
def daemon(extra_env: dict[str, str] | None = None, *args: str) -> Iterator[Daemon]:
    home = Path(tempfile.mkdtemp(prefix="qwen-serve-bench-"))
    env = {**os.environ, "QWEN_HOME": str(home), "QWEN_SERVER_TOKEN": TOKEN, **(extra_env or {})}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serve",
            "run",
            "--port",
            "0",
            "--workspace",
            str(home),
            "--log-level",
            "warning",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        started = time.perf_counter() - t0
        match = LISTENING.match(line)
        if not match:
            raise RuntimeError(f"no listening line: {line!r}")
        yield Daemon(proc, match.group(1), started)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(home, ignore_errors=True)


def ratio(ours: float, theirs: float, *, higher_is_better: bool) -> str:
    factor = ours / theirs if higher_is_better else theirs / ours
    return f"{factor:.1f}x {'better' if factor >= 1 else 'worse'}"


def bench_start_and_rss(runs: int) -> dict[str, Any]:
    starts, stops, rss = [], [], []
    for _ in range(runs):
        with daemon() as d:
            starts.append(d.started_in_s)
            time.sleep(1.0)
            rss.append(d.rss_mb())
            stops.append(d.stop())
    return {
        "cold_start_s": statistics.median(starts),
        "idle_rss_mb": statistics.median(rss),
        "idle_stop_s": statistics.median(stops),
    }


def bench_wrk(duration_s: int) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        return {"wrk": "not installed (apt-get install wrk); request-rate figures skipped"}
    out: dict[str, Any] = {}
    with daemon() as d:
        for name, path in (("status", "/workspace/auth/status"), ("health", "/health")):
            result = subprocess.run(
                [
                    "wrk",
                    "-t2",
                    "-c50",
                    f"-d{duration_s}s",
                    "--latency",
                    "-H",
                    f"Authorization: Bearer {TOKEN}",
                    d.url + path,
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            rps = float(re.search(r"Requests/sec:\s+([\d.]+)", result).group(1))  # type: ignore[union-attr]
            p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", result)
            assert p99 is not None
            scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
            errors = re.search(r"Non-2xx or 3xx responses: (\d+)", result)
            out[f"{name}_rps"] = rps
            out[f"{name}_p99_ms"] = float(p99.group(1)) * scale
            out[f"{name}_non_2xx"] = int(errors.group(1)) if errors else 0
    return out


async def _shutdown_with_subscribers(subscribers: int) -> dict[str, Any]:
    """A pending flow and N WebSocket subscribers; SIGTERM → every subscriber sees `cancelled`, then 1001."""
    idp = FakeIdP(
        device_path="/api/v1/oauth2/device/code",
        token_path="/api/v1/oauth2/token",
        client_id="f0304373b74a44d2b584a3fb70ca9e56",
        scope="openid profile email model.completion",
        expect_request_id=True,
    )
    async with serve_idp(idp) as served:
        with daemon({"QWEN_OAUTH_BASE_URL": served.url}) as d:
            ws_url = d.url.replace("http://", "ws://") + "/workspace/auth/events"
            headers = [("Authorization", f"Bearer {TOKEN}")]
            ws_headers = [(name.encode(), value.encode()) for name, value in headers]  # trio-websocket takes bytes
            closes: list[tuple[int | None, bool]] = []
            received_started: list[float] = []
            connected = 0
            all_connected = trio.Event()

            async def subscriber() -> None:
                nonlocal connected
                async with trio_websocket.open_websocket_url(ws_url, extra_headers=ws_headers) as ws:
                    await ws.get_message()  # hello
                    connected += 1
                    if connected == subscribers:
                        all_connected.set()
                    saw_cancel = False
                    try:
                        while True:
                            frame = json.loads(await ws.get_message())
                            if frame.get("type") == "auth_device_flow_started":
                                received_started.append(time.perf_counter())
                            saw_cancel |= frame.get("type") == "auth_device_flow_cancelled"
                    except trio_websocket.ConnectionClosed as closed:
                        closes.append((closed.reason.code if closed.reason else None, saw_cancel))

            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    for _ in range(subscribers):
                        nursery.start_soon(subscriber)
                    await all_connected.wait()
                    async with httpx.AsyncClient(base_url=d.url, headers=dict(headers)) as client:
                        posted_at = time.perf_counter()
                        response = await client.post("/workspace/auth/device-flow", json={"providerId": "qwen-oauth"})
                        assert response.status_code == 201, response.text
                    while len(received_started) < subscribers:  # noqa: ASYNC110 (bounded by fail_after)
                        await trio.sleep(0.01)
                    fanout_s = max(received_started) - posted_at
                    stop_s = await trio.to_thread.run_sync(d.stop)
            return {
                "subscribers": subscribers,
                "fanout_to_all_s": fanout_s,
                "sigterm_to_exit_s": stop_s,
                "closed_1001_after_cancelled": sum(1 for code, saw in closes if code == 1001 and saw),
            }


def bench_stalled_peer_stop() -> float:
    """SIGTERM while a client pipelines requests and never reads: seconds to exit (SPEC §3: within 1 s)."""
    with daemon() as d:
        port = int(d.url.rsplit(":", 1)[1])
        peer = socket.create_connection(("127.0.0.1", port))
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.settimeout(2)
        burst = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode() * 20_000
        with contextlib.suppress(TimeoutError):
            peer.sendall(burst)  # the server stops reading once its own writes block
        time.sleep(1)  # let the server work through what it read, until its writes are stuck
        try:
            return d.stop()
        finally:
            peer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer runs, shorter loads (a smoke test)")
    args = parser.parse_args()
    runs, duration, subscribers = (2, 2, 100) if args.quick else (5, 10, 1000)

    figures: dict[str, Any] = {}
    figures.update(bench_start_and_rss(runs))
    figures.update(bench_wrk(duration))
    figures["shutdown"] = trio.run(_shutdown_with_subscribers, subscribers)
    figures["stalled_peer_stop_s"] = bench_stalled_peer_stop()

    print(json.dumps(figures, indent=2))
    lo, hi = ORIGINAL["cold_start_s"]
    print(
        f"cold start      {figures['cold_start_s']:.2f} s   (original {lo}-{hi} s: "
        f"{ratio(figures['cold_start_s'], lo, higher_is_better=False)} than its best)"
    )
    print(
        f"idle RSS        {figures['idle_rss_mb']:.0f} MB   (original {ORIGINAL['idle_rss_mb']:.0f} MB + child: "
        f"{ratio(figures['idle_rss_mb'], ORIGINAL['idle_rss_mb'], higher_is_better=False)})"
    )
    print(f"idle SIGTERM    {figures['idle_stop_s']:.2f} s to exit (target < 1 s)")
    print(f"stalled SIGTERM {figures['stalled_peer_stop_s']:.2f} s to exit with a peer that never reads (target < 1 s)")
    if "status_rps" in figures:
        print(
            f"status          {figures['status_rps']:.0f} req/s, p99 {figures['status_p99_ms']:.1f} ms   "
            f"(original {ORIGINAL['status_rps']:.0f} req/s: "
            f"{ratio(figures['status_rps'], ORIGINAL['status_rps'], higher_is_better=True)}; "
            f"p99 {ORIGINAL['status_p99_ms']:.0f} ms: "
            f"{ratio(figures['status_p99_ms'], ORIGINAL['status_p99_ms'], higher_is_better=False)})"
        )
        print(f"health          {figures['health_rps']:.0f} req/s, p99 {figures['health_p99_ms']:.1f} ms")
    s = figures["shutdown"]
    print(f"fan-out         one event to {s['subscribers']} WebSocket subscribers in {s['fanout_to_all_s']:.2f} s")
    print(
        f"busy SIGTERM    {s['sigterm_to_exit_s']:.2f} s to exit with a pending flow and {s['subscribers']} "
        f"subscribers; {s['closed_1001_after_cancelled']} closed 1001 after their `cancelled` event"
    )


if __name__ == "__main__":
    main()
