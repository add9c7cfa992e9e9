#!/usr/bin/env python
"""`reolm finetune` as a script: fine-tune Reo-LM or train a baseline on one domain (see --help)."""

import sys

from reolm.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["finetune", *sys.argv[1:]]))
