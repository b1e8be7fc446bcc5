# expect: os.system
"""`posix` is `os` under another name."""

import posix

posix.system("true")
