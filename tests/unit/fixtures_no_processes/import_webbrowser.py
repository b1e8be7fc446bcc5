# expect: webbrowser
import webbrowser

webbrowser.open("https://example.com")
