"""Pieces shared by ``reolm prepare`` and ``reolm import``: image options and writing the domain."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Mapping, Sequence

from reolm.data.domain import Domain, domain_stats, format_stats_table, write_domain
from reolm.data.images import ImageOptions, ImageSink, from_directory, from_shards
from reolm.data.ingest_report import IngestReport


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="domain name (recorded in domain.json and shard manifests)")
    parser.add_argument("--out", required=True, metavar="DIR", help="processed domain folder to write")
    parser.add_argument("--force", action="store_true", help="overwrite an existing processed folder at --out")


def add_unescape_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--unescape-html / --no-unescape-html, on by default (recorded in domain.json's ingest options)."""
    parser.add_argument("--unescape-html", action=argparse.BooleanOptionalAction, default=True,
                        help="unescape HTML entities (&quot; -> \", &amp; -> &) in item text; the choice is "
                             "recorded in domain.json (default on)")


def add_image_arguments(parser: argparse.ArgumentParser, shards: bool = False) -> None:
    group = parser.add_argument_group("images")
    group.add_argument("--images-dir", metavar="D", help="directory of <item_id>.<jpg|jpeg|png|webp> images")
    if shards:
        group.add_argument("--image-shards", metavar="GLOB",
                           help="img2dataset WebDataset shards (<key>.jpg + <key>.json with 'url'), joined to "
                                "items by the metadata's imageURLHighRes / imageURL")
    group.add_argument("--max-image-side", type=int, default=512,
                       help="shrink images whose longer side exceeds this many pixels (default 512)")
    group.add_argument("--min-image-side", type=int, default=32,
                       help="drop images whose shorter side is below this many pixels (default 32)")


def check_output(out: str, force: bool) -> Path:
    path = Path(out)
    if (path / "domain.json").exists() and not force:
        raise ValueError(f"{path} already holds a processed domain; pass --force to overwrite it")
    return path


def attach_images(domain: Domain, out: Path, args: argparse.Namespace, report: IngestReport,
                  url_to_items: Mapping[str, Sequence[int]] | None = None) -> None:
    """Store the images named by --images-dir / --image-shards and set ``domain.has_image``."""
    shards = getattr(args, "image_shards", None)
    if not args.images_dir and not shards:
        return
    options = ImageOptions(max_side=args.max_image_side, min_side=args.min_image_side)
    sink = ImageSink(out, domain.item_ids(), options, report)
    if args.images_dir:
        from_directory(args.images_dir, sink, domain.smap)
    if shards:
        from_shards(shards, sink, url_to_items or {})
    domain.has_image = sink.finish()


def write_and_summarise(domain: Domain, out: Path, report: IngestReport) -> int:
    """Write the folder (report saved in domain.json) and print the summary and stats row."""
    domain.extra.setdefault("ingest", {})["report"] = report.to_dict()
    write_domain(domain, out)
    print(report.summary())
    print(format_stats_table([domain_stats(domain)]))
    print(f"wrote {out}")
    return 0
