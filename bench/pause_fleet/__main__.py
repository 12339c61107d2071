"""``python -m bench.pause_fleet``: see the package's docstring, or ``--help``."""

from bench.pause_fleet.cli import main

if __name__ == "__main__":
    main()
