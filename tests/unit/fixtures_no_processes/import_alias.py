# expect: subprocess
"""`import ... as` does not hide the module."""

import subprocess as sp

sp.Popen(["true"])
