# expect: webbrowser.open
from webbrowser import open as open_url

open_url("https://example.com")
