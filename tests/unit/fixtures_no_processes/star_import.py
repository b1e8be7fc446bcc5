# expect: os.*
from os import *  # noqa: F403

print(sep)  # noqa: F405
