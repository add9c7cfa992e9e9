"""reolm prepare SOURCE ... : raw public data -> a processed domain folder."""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

from reolm.commands._ingest_common import (add_image_arguments, add_output_arguments, add_unescape_argument,
                                           attach_images, check_output, write_and_summarise)
from reolm.data.amazon import CATEGORY_STYLES, DUPLICATE_POLICIES, AmazonOptions, build_amazon_domain
from reolm.io import write_text

DESCRIPTION = """Turn raw data into a processed domain folder (train/val/test, smap, umap, meta_data, domain.json).

Sources:
  amazon   Amazon Reviews 2018 per-category files (reviews *_5.json.gz or the full file + meta_*.json.gz)

A pre-training corpus is several prepared categories sharded together:
  reolm prepare amazon --reviews Automotive_5.json.gz --meta meta_Automotive.json.gz --name Automotive --out data/Automotive
  ...one per category...
  reolm shard data/Automotive data/Electronics ... --out shards/pretrain
"""

AMAZON_DESCRIPTION = """Amazon Reviews 2018 -> processed domain folder, streaming (bounded memory).

Steps (counted in the summary and in domain.json "ingest.report"): malformed lines are reported
as file:line and skipped; metadata without a title is dropped (--no-require-title keeps it);
HTML entities are unescaped; interactions of items without metadata are dropped; duplicates
follow --duplicates; an iterative (--user-k, --item-k) core is kept; each user's items are put in
time order (ties keep file order); the last item is test, the second to last val, the rest train.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="source", metavar="SOURCE", required=True)
    amazon = sub.add_parser("amazon", help="Amazon Reviews 2018 reviews + metadata files",
                            description=AMAZON_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    amazon.add_argument("--reviews", required=True, metavar="FILE",
                        help="reviews file, JSON lines (.json.gz or plain): reviewerID, asin, unixReviewTime")
    amazon.add_argument("--meta", required=True, metavar="FILE",
                        help="metadata file (meta_*.json.gz): asin, title, brand, category, imageURL(HighRes); "
                             "JSON or Python-literal lines")
    add_output_arguments(amazon)
    filters = amazon.add_argument_group("filters")
    filters.add_argument("--user-k", type=int, default=5, help="keep users with >= K interactions (k-core, >= 3; default 5)")
    filters.add_argument("--item-k", type=int, default=5, help="keep items with >= K interactions (k-core; default 5, 0 = off)")
    filters.add_argument("--duplicates", choices=DUPLICATE_POLICIES, default="exact",
                         help="exact: drop repeated (user, item, time); user-item: keep a user's earliest "
                              "interaction with an item; keep: keep all (default exact)")
    filters.add_argument("--category", choices=CATEGORY_STYLES, default="full",
                         help="full: the category path joined by spaces (Recformer); drop-top: without the "
                              "top-level category shared by the whole file (default full)")
    filters.add_argument("--require-title", action=argparse.BooleanOptionalAction, default=True,
                         help="drop items whose metadata has no title (default on)")
    add_unescape_argument(filters)
    filters.add_argument("--allow-truncated", action="store_true",
                         help="keep the lines read before a truncated/corrupt gzip stream instead of failing")
    add_image_arguments(amazon, shards=True)
    amazon.add_argument("--write-image-urls", metavar="FILE",
                        help="write the image URLs of the kept items to FILE, one per line (img2dataset "
                             "--input_format txt); the shards it downloads join back through --image-shards")
    amazon.add_argument("--debug", action="store_true", help="show tracebacks")
    amazon.set_defaults(handler=run_amazon)


def run_amazon(args: argparse.Namespace) -> int:
    out = check_output(args.out, args.force)
    options = AmazonOptions(require_title=args.require_title, unescape_html=args.unescape_html,
                            user_k=args.user_k, item_k=args.item_k, duplicates=args.duplicates,
                            category=args.category, allow_truncated=args.allow_truncated,
                            keep_image_urls=bool(args.image_shards or args.write_image_urls))
    domain, items, report = build_amazon_domain(args.name, args.reviews, args.meta, options)
    url_to_items: dict[str, list[int]] = defaultdict(list)
    for index, urls in items.image_urls.items():
        for url in urls:
            url_to_items[url].append(index)
    if args.write_image_urls:
        write_url_list(args.write_image_urls, items.image_urls)
    attach_images(domain, out, args, report, url_to_items)
    return write_and_summarise(domain, out, report)


def write_url_list(path: str | Path, image_urls: Mapping[int, Sequence[str]]) -> None:
    """Each kept item's first URL (high resolution first), once, in item order; written atomically.

    One URL per item is enough: --image-shards joins a downloaded image back through any of the item's URLs.
    """
    urls = dict.fromkeys(image_urls[i][0] for i in sorted(image_urls) if image_urls[i])
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text(target, "".join(url + "\n" for url in urls))
    print(f"wrote {len(urls):,} image URLs to {target}")


def run(args: argparse.Namespace) -> int:
    return args.handler(args)
