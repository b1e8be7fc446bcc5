# expect: subprocess.Popen
"""`from <banned module> import name`."""

from subprocess import Popen

Popen(["true"])
