"""`python -m serve` is the `qwen-serve` command."""

from serve.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
