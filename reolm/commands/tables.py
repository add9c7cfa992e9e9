"""reolm tables tokens|images: build derived item tables under a corpus or domain folder."""

from __future__ import annotations

import argparse
import time

DESCRIPTION = """\
reolm tables tokens --tokenizer DIR (--corpus C | --domain D [D ...])
    Tokenise every item once (attributes in order, key then value tokens, cut to
    --max-attr-tokens, empty values as "void") into ROOT/tables/tokens-<key>/,
    rows = global item index (corpus) or item index (domain). <key> identifies the
    tokenizer and rendering settings, so tables of several tokenizers coexist.

reolm tables images --vision DIR (--corpus C | --domain D [D ...]) [--batch-size N]
    Run a local HF vision checkpoint (AutoModel + AutoImageProcessor: CLIP/SigLIP,
    BEiT, DINOv2, ViT...) over every item image; pooled output as float16
    [num_items, d] + has_image. Corpus: CORPUS/tables/images-<key>/; domain:
    DIR/image_features.npy + DIR/has_image.npy. Resumable (per-shard partial
    files); under `torchrun --nproc_per_node N -m reolm tables images ...` each
    rank takes a slice of the shards and rank 0 merges."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="table", metavar="TABLE", required=True)
    tokens = sub.add_parser("tokens", help="item token table for one tokenizer", description=DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    tokens.add_argument("--tokenizer", required=True, help="local HF tokenizer (or model) directory")
    tokens.add_argument("--max-attr-tokens", type=int, default=32, help="tokens per attribute (default 32)")
    tokens.add_argument("--batch-size", type=int, default=4096, help="items per tokenizer call (default 4096)")
    images = sub.add_parser("images", help="image feature table for one vision model", description=DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    images.add_argument("--vision", required=True, help="local HF vision checkpoint directory")
    images.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    images.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    images.add_argument("--units-per-chunk", type=int, default=2048,
                        help="domain folders: items per resumable chunk (default 2048)")
    for p in (tokens, images):
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--corpus", help="shard corpus (folder with manifest.json)")
        src.add_argument("--domain", nargs="+", metavar="DIR",
                         help="processed domain folder(s); several are done one after the other in one process")
        p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    roots = [args.corpus] if args.corpus else args.domain
    for root in roots:
        _build(args, root)
    return 0


def _build(args: argparse.Namespace, root: str) -> None:
    start = time.perf_counter()
    if args.table == "tokens":
        from reolm.data.corpus import build_source_token_table
        from reolm.data.tables import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        out = build_source_token_table(root, tokenizer, args.max_attr_tokens, args.batch_size,
                                       progress=not args.quiet)
        print(f"wrote token table {out} in {time.perf_counter() - start:.1f}s")
        return
    from reolm.vision.features import build_image_features

    out = build_image_features(root, args.vision, batch_size=args.batch_size, device=args.device,
                               chunk_items=args.units_per_chunk, progress=not args.quiet)
    if out is not None:  # only rank 0 merges and reports
        print(f"wrote image features {out} in {time.perf_counter() - start:.1f}s")
