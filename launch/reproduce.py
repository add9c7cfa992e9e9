#!/usr/bin/env python
"""`reolm reproduce` as a script: the paper's recipe end to end (see --help and docs/reproduce.md)."""

import sys

from reolm.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["reproduce", *sys.argv[1:]]))
