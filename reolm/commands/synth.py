"""reolm synth: generate a synthetic multi-domain corpus of processed domain folders."""

from __future__ import annotations

import argparse
import time

DESCRIPTION = """\
Write one processed domain folder per domain under --out (train/val/test.json,
smap/umap.json, meta_data.json, domain.json with "role": pretrain|downstream,
images/<item_id>.png|jpg and has_image.npy when images are on), plus corpus.json.

Items have category/title/brand text drawn from latent topics shared by all
domains; user sequences follow one topic-level Markov chain shared by all
domains; for some imaged items the topic is visible only in the image.

Presets:
  tiny   3 pre-training + 1 downstream domain, ~100 users/items each (tests)
  demo   4 pre-training + 1 downstream domain, ~2k users each (CPU demo)
  paper  7 pre-training domains with exactly the paper's totals: 3,608,532 users,
         1,022,309 items, 33,572,032 interactions; text only unless --images
Output is deterministic given --seed; generation streams in bounded memory."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=("tiny", "demo", "paper"), default="tiny", help="corpus size")
    parser.add_argument("--out", required=True, help="output folder (one sub-folder per domain)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    images = parser.add_mutually_exclusive_group()
    images.add_argument("--no-images", dest="images", action="store_false", default=None,
                        help="text only (default for the paper preset)")
    images.add_argument("--images", dest="images", action="store_true", help="draw item images")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from reolm.data.domain import domain_stats, format_stats_table, read_domain
    from reolm.data.synth import generate_corpus, preset_config

    start = time.perf_counter()
    cfg = preset_config(args.preset, images=args.images)
    paths = generate_corpus(cfg, args.out, seed=args.seed, progress=not args.quiet)
    print(f"wrote {len(paths)} domains to {args.out} in {time.perf_counter() - start:.1f}s")
    if args.preset != "paper":  # reading back the paper preset would hold it all in memory
        print(format_stats_table(domain_stats(read_domain(p, load_features=False)) for p in paths))
    return 0
