"""Entry point usable without installing the command: `python cli.py run smollm2-demo` (e.g. from a notebook)."""

from spa_lite.cli import main

if __name__ == "__main__":
    main()
