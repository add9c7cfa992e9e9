#!/usr/bin/env python
r"""Pre-train Reo-LM with DeepSpeed on WebDataset shards (every rank runs this script).

    python launch/pretrain.py --config launch/configs/pretrain/demo.yaml             # one process
    deepspeed --num_gpus 8 launch/pretrain.py --config launch/configs/pretrain/paper.yaml \
        model.backbone=/models/MiniLM-L12-H384 data.corpus=shards/amazon
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        launch/pretrain.py --config ...
    sbatch --nodes 4 launch/slurm/pretrain.sbatch --config ...                         # Slurm

Configuration: YAML files (--config, later ones win) then key=value overrides; every key is
listed below.  See docs/training.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from reolm.train.stopsignal import catch_stop_signals  # noqa: E402

# First: a time-limit warning or preemption during the (long) start-up is kept for the trainer,
# which checkpoints at its first step boundary, instead of killing this rank.
catch_stop_signals()

from reolm.cli import debug_requested  # noqa: E402

from reolm.config import ConfigError, config_help_epilog, load_config  # noqa: E402
from reolm.train.config import PretrainConfig  # noqa: E402
from reolm.runtime import setup_process  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=config_help_epilog(PretrainConfig),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="config file (repeatable; later files override earlier ones)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=1e-4")
    parser.add_argument("--resume", default=None, metavar="latest|PATH",
                        help="shorthand for ckpt.resume=...: 'latest' resumes the newest checkpoint of the run")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # The deepspeed launcher passes --local_rank=N; torchrun and srun use the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    # Intermixed: overrides may follow --resume (the Slurm script appends run_dir=... after the user's args).
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_process()
    overrides = list(args.overrides) + ([f"ckpt.resume={args.resume}"] if args.resume else [])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(PretrainConfig, args.config, overrides)
    except ConfigError as err:
        print(f"pretrain.py: error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        from reolm.config import to_dict
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from reolm.train import distributed
    from reolm.train.trainer import TrainingAborted, run

    distributed.setup_env(local_rank_arg=args.local_rank)
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one rank speaks
    try:
        run(cfg)
    except (ValueError, FileNotFoundError, TrainingAborted) as err:
        # Our error classes (ConfigError, DataError, TableError, CheckpointError, ...) are
        # ValueErrors whose message is written for the user; REOLM_DEBUG=1 shows the traceback.
        if debug_requested():
            raise
        print(f"pretrain.py: error (rank {os.environ.get('RANK', '0')}): {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
