"""reolm pretrain: pre-train Reo-LM with DeepSpeed on WebDataset shards (every rank runs it).

Importing this module is entering a rank's entry point, so its first lines catch stop signals
(Slurm's time-limit warning, preemption) before anything heavy is imported: one that arrives
during the long start-up is kept for the trainer, which checkpoints at its first step boundary.
"""

from __future__ import annotations

from reolm.train.stopsignal import catch_stop_signals

catch_stop_signals()

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402

from reolm.commands import CommandError  # noqa: E402
from reolm.config import config_help_epilog, load_config  # noqa: E402
from reolm.train.config import PretrainConfig  # noqa: E402

DESCRIPTION = r"""Pre-train Reo-LM with DeepSpeed on WebDataset shards (every rank runs this command).

    reolm pretrain --config launch/configs/pretrain/demo.yaml                        # one process
    deepspeed --num_gpus 8 launch/pretrain.py --config launch/configs/pretrain/paper.yaml \
        model.backbone=/models/MiniLM-L12-H384 data.corpus=shards/amazon
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        launch/pretrain.py --config ...
    sbatch --nodes 4 launch/slurm/pretrain.sbatch --config ...                         # Slurm

The launchers start launch/pretrain.py, the same command as a script. Configuration: YAML files
(--config, later ones win) then key=value overrides; every key is listed below. See docs/training.md."""

# Overrides may follow --resume (the Slurm script appends run_dir=... after the user's arguments).
INTERMIXED = True


def epilog() -> str:
    return config_help_epilog(PretrainConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="config file (repeatable; later files override earlier ones)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=1e-4")
    parser.add_argument("--resume", default=None, metavar="latest|PATH",
                        help="shorthand for ckpt.resume=...: 'latest' resumes the newest checkpoint of the run")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # The deepspeed launcher passes --local_rank=N; torchrun and srun use the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"ckpt.resume={args.resume}"] if args.resume else [])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(PretrainConfig, args.config, overrides)
    if args.print_config:
        import yaml

        from reolm.config import to_dict
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from reolm.train import distributed
    from reolm.train.trainer import TrainingAborted, run as train

    distributed.setup_env(local_rank_arg=args.local_rank)
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one rank speaks
    try:
        train(cfg)
    except TrainingAborted as err:
        raise CommandError(str(err)) from err
    return 0
