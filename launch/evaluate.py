#!/usr/bin/env python
"""`reolm evaluate` as a script: evaluate a saved model or a plain checkpoint by full ranking (see --help)."""

import sys

from reolm.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["evaluate", *sys.argv[1:]]))
