# expect: os.execv
import os

os.execv("/bin/true", ["true"])
