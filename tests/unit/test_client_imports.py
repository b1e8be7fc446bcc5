"""The client imports nothing of the server (SPEC §6): checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import serve.client
import serve.cli
loaded = sorted(name for name in ("quart", "quart_trio", "hypercorn", "serve.registry", "serve.daemon",
    "serve.http", "serve.store") if name in sys.modules)
print(",".join(loaded))
"""


def test_importing_the_client_and_the_cli_loads_no_server_module() -> None:
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "", f"loaded: {done.stdout.strip()}"
