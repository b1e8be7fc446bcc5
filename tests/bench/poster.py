"""The POSTs whose latency the subscriber scenario reports, sent from a process of their own.

In the bench's process, a 201 that arrives while the thousand subscribers' frames of the same event are
being read waits for that reading (one Trio loop, one GIL): the figure then measures the bench, not the
daemon. A child process (this module's `main`, a blocking httpx client driven over its stdin) sends them
instead. Its send times are `time.perf_counter()`, which on Linux is CLOCK_MONOTONIC and so comparable with
the arrival times the subscribers record in the bench's process.

Protocol, a line each way: `start PROVIDER` → `ok FLOW_ID SENT_AT LATENCY_S`, `cancel FLOW_ID` → `ok SENT_AT`,
anything failing → `error WHAT`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx
import trio

FLOWS_PATH = "/workspace/auth/device-flow"


class Poster:
    """The parent's side: starts the child, sends it commands, reads its answers."""

    def __init__(self, base_url: str, token: str) -> None:
        self._argv = [sys.executable, "-m", "bench.poster", base_url, token]
        self._process: trio.Process | None = None
        self._buffer = b""

    async def __aenter__(self) -> Poster:
        tests = Path(__file__).resolve().parent.parent  # `-m bench.poster` from there
        self._process = await trio.lowlevel.open_process(
            self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=str(tests)
        )
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        process = self._process
        if process is not None:
            assert process.stdin is not None
            await process.stdin.aclose()
            with trio.move_on_after(5):
                await process.wait()
            process.kill()
            await process.wait()

    async def start_flow(self, provider_id: str) -> tuple[str, float, float]:
        """POST a login: (its deviceFlowId, when the child sent it, the POST's latency in seconds)."""
        _, flow_id, sent_at, latency = (await self._ask(f"start {provider_id}")).split()
        return flow_id, float(sent_at), float(latency)

    async def cancel_flow(self, flow_id: str) -> float:
        """DELETE a login; when the child sent the DELETE."""
        _, sent_at = (await self._ask(f"cancel {flow_id}")).split()
        return float(sent_at)

    async def _ask(self, command: str) -> str:
        process = self._process
        assert process is not None and process.stdin is not None and process.stdout is not None
        await process.stdin.send_all(command.encode() + b"\n")
        while b"\n" not in self._buffer:
            chunk = await process.stdout.receive_some(4096)
            if not chunk:
                raise RuntimeError(f"the poster process ended during `{command}`")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        answer = line.decode()
        if not answer.startswith("ok"):
            raise RuntimeError(f"poster: `{command}` failed: {answer}")
        return answer


def main(base_url: str, token: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base_url, headers=headers, trust_env=False, timeout=30) as client:
        client.get("/health")  # the connection is open before the first timed request
        for line in sys.stdin:
            command, _, argument = line.strip().partition(" ")
            if command == "start":
                sent_at = time.perf_counter()
                response = client.post(FLOWS_PATH, json={"providerId": argument})
                latency = time.perf_counter() - sent_at
                if response.status_code != 201:
                    answer = f"error POST answered {response.status_code}"
                else:
                    answer = f"ok {response.json()['deviceFlowId']} {sent_at!r} {latency!r}"
            elif command == "cancel":
                sent_at = time.perf_counter()
                response = client.delete(f"{FLOWS_PATH}/{argument}")
                ok = response.status_code == 204
                answer = f"ok {sent_at!r}" if ok else f"error DELETE answered {response.status_code}"
            else:
                answer = f"error unknown command {command!r}"
            print(answer, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
