# expect: subprocess
"""`__import__` with a literal name."""

__import__("subprocess").run(["true"], check=True)
