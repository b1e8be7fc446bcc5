# expect: dynamic attribute of os
import os

name = "sys" + "tem"
getattr(os, name)("true")
