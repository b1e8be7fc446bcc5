"""`python -m serve` is the `qwen-serve` command."""

from serve.cli import entry

if __name__ == "__main__":
    entry()
