# expect: os.posix_spawn
"""An aliased `os` is still `os`."""

import os as operating_system

operating_system.posix_spawn("/bin/true", ["true"], {})
