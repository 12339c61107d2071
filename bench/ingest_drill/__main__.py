"""``python -m bench.ingest_drill``: see the package's docstring, or ``--help``."""

from bench.ingest_drill.cli import main

if __name__ == "__main__":
    main()
