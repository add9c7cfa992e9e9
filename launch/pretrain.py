#!/usr/bin/env python
"""`reolm pretrain` as a script, the entry point every rank runs under the `deepspeed` launcher,
torchrun or Slurm (launch/slurm/pretrain.sbatch); see --help and docs/training.md."""

import sys

# First, before anything heavy is imported: a stop signal during the start-up is kept for the
# trainer, which checkpoints at its first step boundary, instead of killing this rank.
from reolm.train.stopsignal import catch_stop_signals

catch_stop_signals()

from reolm.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["pretrain", *sys.argv[1:]]))
