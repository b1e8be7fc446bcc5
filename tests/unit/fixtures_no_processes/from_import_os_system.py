# expect: os.system
"""`from os import system`, renamed."""

from os import system as run_shell

run_shell("true")
