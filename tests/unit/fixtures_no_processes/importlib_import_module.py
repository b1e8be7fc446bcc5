# expect: webbrowser
import importlib

importlib.import_module("webbrowser").open("https://example.com")
