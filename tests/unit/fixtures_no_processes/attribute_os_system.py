# expect: os.system
"""An attribute of an allowed module."""

import os

os.system("true")
