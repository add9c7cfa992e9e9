"""reolm shard: processed domain folders -> WebDataset corpus."""

from __future__ import annotations

import argparse
import time

DESCRIPTION = """\
Write processed domain folders (in the order given: it fixes domain indices and
global item indices) as a WebDataset corpus:

  OUT/items/items-%06d.tar   one sample per item (json + jpg/png image bytes)
  OUT/train/train-%06d.tar   one sample per (user, domain) training sequence
  OUT/dev/dev-%06d.tar       the same plus the held-out validation target
  OUT/manifest.json          written last; per-shard counts, bytes and sha256

Sequences are shuffled across shards with --seed (same inputs + seed = same
bytes). The format is specified in shards/README.md. Memory stays bounded: one
domain is read at a time and sequences are shuffled through on-disk buckets.
Unreadable images are left out (the item is kept) and summarised; malformed
domain files stop with an error naming the file and key."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("domains", nargs="+", metavar="DOMAIN_DIR", help="processed domain folders (or a `reolm synth` output folder, for all its domains)")
    parser.add_argument("--out", required=True, help="corpus folder, e.g. shards/NAME")
    parser.add_argument("--name", help="corpus name in the manifest (default: the folder name)")
    parser.add_argument("--max-count", type=int, default=10_000, help="samples per shard (default 10000)")
    parser.add_argument("--max-size", type=int, default=1 << 30, help="bytes per shard (default 1 GiB)")
    parser.add_argument("--seed", type=int, default=0, help="shuffling seed (default 0)")
    parser.add_argument("--max-image-side", type=int, default=None, metavar="PX",
                        help="downscale images whose longer side exceeds PX (re-encoded); default keeps bytes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing corpus at --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import sys

    from reolm.data.domain import resolve_domain_dirs
    from reolm.data.shards import ShardOptions, write_corpus

    start = time.perf_counter()
    opts = ShardOptions(max_count=args.max_count, max_size=args.max_size, seed=args.seed,
                        max_image_side=args.max_image_side, progress=not args.quiet)
    domains = resolve_domain_dirs(args.domains, warn=lambda msg: print(msg, file=sys.stderr))
    m = write_corpus(domains, args.out, opts, name=args.name, overwrite=args.overwrite)
    t = m["totals"]
    print(f"wrote {args.out}: {t['items']:,} items ({t['images']:,} images) in {len(m['shards']['items'])} "
          f"shards, {t['train']:,} train / {t['dev']:,} dev sequences in {len(m['shards']['train'])} / "
          f"{len(m['shards']['dev'])} shards, {time.perf_counter() - start:.1f}s")
    skipped = {k: v for k, v in m["skipped"].items() if v}
    if skipped:
        print("skipped: " + ", ".join(f"{k}={v}" for k, v in skipped.items()))
    return 0
