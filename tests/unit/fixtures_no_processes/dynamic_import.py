# expect: dynamic import
"""A module name the checker cannot read is refused as such."""

import importlib

name = "".join(["sub", "process"])
importlib.import_module(name)
