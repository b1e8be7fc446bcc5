# expect: pty
from importlib import import_module

import_module("pty").spawn("sh")
