# expect: subprocess
"""`import` of a process-spawning module."""

import subprocess

subprocess.run(["true"], check=True)
