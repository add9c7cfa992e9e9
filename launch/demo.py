#!/usr/bin/env python
"""`make demo`: `reolm demo` as a script, the whole pipeline on an embedded synthetic corpus (see --help)."""

import sys

from reolm.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["demo", *sys.argv[1:]]))
