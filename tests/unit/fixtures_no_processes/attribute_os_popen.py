# expect: os.popen
import os

os.popen("true").read()
