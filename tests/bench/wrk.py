"""wrk (Debian's package) against one server: requests per second, latency percentiles, and the server's
CPU time per request from its process tree's utime + stime before and after the run."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from bench.processes import RunningServer

INSTALL_HINT = "wrk is not on PATH: install it with `apt-get install -y wrk` (as root; nox -s bench does it when root)"

_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PERCENTILE = r"^\s*{}%\s+([\d.]+)(us|ms|s|m|h)\s*$"
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h),", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: (.*)")


@dataclass(frozen=True, slots=True)
class Load:
    """One wrk run: what wrk reported, and the server's CPU seconds over it."""

    requests: int
    duration_s: float
    rps: float
    p50_s: float
    p99_s: float
    non_2xx: int
    socket_errors: str | None
    server_cpu_s: float

    @property
    def cpu_per_request_s(self) -> float:
        return self.server_cpu_s / self.requests if self.requests else float("nan")


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str:
    wrk = wrk_path()
    if wrk is None:
        return "not installed"
    # `wrk -v` prints its banner and usage, exiting 1.
    out = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    banner = (out.stdout or out.stderr).splitlines()
    return banner[0].split(" Copyright")[0].strip() if banner else "unknown"


def _percentile(output: str, percent: int) -> float:
    match = re.search(_PERCENTILE.format(percent), output, re.MULTILINE)
    if match is None:
        raise ValueError(f"wrk printed no {percent}% latency:\n{output}")
    return float(match.group(1)) * _UNITS_S[match.group(2)]


def parse(output: str, server_cpu_s: float) -> Load:
    total = _TOTAL.search(output)
    rps = _RPS.search(output)
    if total is None or rps is None:
        raise ValueError(f"cannot read wrk's output:\n{output}")
    non_2xx = _NON_2XX.search(output)
    socket_errors = _SOCKET_ERRORS.search(output)
    return Load(
        requests=int(total.group(1)),
        duration_s=float(total.group(2)) * _UNITS_S[total.group(3)],
        rps=float(rps.group(1)),
        p50_s=_percentile(output, 50),
        p99_s=_percentile(output, 99),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=socket_errors.group(1).strip() if socket_errors else None,
        server_cpu_s=server_cpu_s,
    )


def wrk_command(url: str, token: str | None, *, threads: int, connections: int, duration_s: int) -> list[str]:
    wrk = wrk_path()
    if wrk is None:
        raise RuntimeError(INSTALL_HINT)
    auth = ["-H", f"Authorization: Bearer {token}"] if token else []
    return [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--latency", *auth, url]


def load(server: RunningServer, path: str, *, threads: int, connections: int, duration_s: int) -> Load:
    """Run wrk against `server` on `path`; the server's CPU is summed over its whole process tree."""
    command = wrk_command(
        server.url + path, server.spec.token, threads=threads, connections=connections, duration_s=duration_s
    )
    cpu_before = server.cpu_seconds()
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=duration_s + 60)
    cpu_after = server.cpu_seconds()
    if result.returncode != 0:
        raise RuntimeError(f"wrk exited {result.returncode}: {result.stderr.strip() or result.stdout.strip()}")
    return parse(result.stdout, cpu_after - cpu_before)
