# expect: pty
import pty

pty.spawn("sh")
