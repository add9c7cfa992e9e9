#!/usr/bin/env python
"""`reolm pretrain` as a script, the entry point every rank runs under the `deepspeed` launcher,
torchrun or Slurm (launch/slurm/pretrain.sbatch); see --help and docs/training.md. The command's
module catches stop signals before it imports anything heavy (reolm/commands/pretrain.py)."""

import sys

from reolm.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["pretrain", *sys.argv[1:]]))
