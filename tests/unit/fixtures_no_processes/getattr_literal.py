# expect: os.system
import os

getattr(os, "system")("true")  # noqa: B009  (the getattr form is the point)
