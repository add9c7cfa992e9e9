"""Small raw Amazon 2018 files and the HTTP server of their images: the inputs of the tiny recipe.

``launch/reproduce.py --config launch/configs/reproduce/tiny.yaml --tiny-inputs`` runs the paper's
recipe (:mod:`reolm.recipe`, the same stages as ``paper.yaml``) on inputs made here:

* :func:`write_raw_files` writes ``<Category>_5.json.gz`` reviews and ``meta_<Category>.json.gz``
  metadata in the published formats (``reviewerID``/``asin``/``unixReviewTime`` review lines;
  metadata with ``title``, ``brand``, ``category`` paths, ``imageURLHighRes``/``imageURL`` lists),
  including what the recipe's filters exist for: items without a title or without images,
  reviews of items that have no metadata, users with too few reviews, repeated reviews, HTML
  entities in titles;
* every image URL points at :class:`ImageServer` on ``127.0.0.1``, which draws a JPEG for the
  item on request.  A few URLs fail the way the real ones do: ``/404/`` answers 404, ``/slow/``
  answers after the downloader's timeout, ``/junk/`` returns HTML bytes labelled ``image/jpeg``;
* the tokenizer of the random-weight backbone (``reolm init backbone``) is trained on the
  metadata's words (:func:`write_tokenizer`).

Everything is a function of the category name and the seed, so the files are the same on every
machine.  :func:`expected_image_color` is what the server draws for an item, so a test can check
that every stored image is the item's own.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import random
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Sequence

__all__ = ["TinyCategorySpec", "write_raw_files", "write_tokenizer", "ImageServer", "expected_image_color",
           "FAILURE_KINDS", "SERVER_FILE", "tiny_specs", "tiny_input_stages", "serve_tiny_inputs"]

SERVER_FILE = "image_server.json"  # in the raw folder: the port the URLs of the metadata name
FAILURE_KINDS = ("404", "slow", "junk")
SLOW_SECONDS = 6.0  # a /slow/ URL answers after this long: longer than the tiny preset's download timeout
IMAGE_SIZE = (48, 40)  # width, height of the served JPEGs

_TOPICS = ["lamp", "cable", "brush", "guitar", "filter", "kettle", "helmet", "canvas", "drill", "leash",
           "speaker", "pencil", "tripod", "mixer", "scarf", "battery"]
_ADJECTIVES = ["compact", "deluxe", "portable", "classic", "sturdy", "premium", "mini", "quiet"]
_BRANDS = ["Acme", "Borealis", "Cobalt", "Dune", "Ember", "Fjord"]


@dataclass(frozen=True)
class TinyCategorySpec:
    """How one category's raw files are drawn."""

    users: int = 120
    items: int = 60
    slow_urls: int = 0  # images that time out (each costs the downloader its timeout once)


def _rng(*parts: object) -> random.Random:
    return random.Random(hashlib.sha256("/".join(map(str, parts)).encode()).digest())


def _asin(category: str, index: int) -> str:
    code = int(hashlib.sha256(category.encode()).hexdigest()[:6], 16) % 10**5
    return f"B{code:05d}{index:04d}"


def expected_image_color(asin: str) -> tuple[int, int, int]:
    """The colour of the JPEG the server draws for ``asin`` (any URL path of it)."""
    digest = hashlib.sha256(asin.encode()).digest()
    return (40 + digest[0] % 176, 40 + digest[1] % 176, 40 + digest[2] % 176)


def _jpeg(asin: str) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", IMAGE_SIZE, expected_image_color(asin)).save(out, "JPEG", quality=95)
    return out.getvalue()


def _failure(category: str, index: int, spec: TinyCategorySpec) -> str:
    """'' (the image downloads) or the way this item's first image URL fails."""
    if index < spec.slow_urls:
        return "slow"
    if index % 19 == 4:
        return "404"
    if index % 23 == 10:
        return "junk"
    return ""


def write_raw_files(raw_dir: str | Path, categories: dict[str, TinyCategorySpec], port: int,
                    seed: int = 0) -> list[Path]:
    """``<Category>_5.json.gz`` + ``meta_<Category>.json.gz`` per category; returns the written paths."""
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{port}"
    written = []
    for c, (category, spec) in enumerate(categories.items()):
        rng = _rng(seed, category)
        top = category.replace("_", " ")
        meta_lines, topics = [], []
        for i in range(spec.items):
            asin = _asin(category, i)
            topic = (i * 7 + c) % len(_TOPICS)
            topics.append(topic)
            record: dict = {"asin": asin, "category": [top, f"{_TOPICS[topic].title()}s"],
                            "description": [f"A {_TOPICS[topic]} for every day."], "feature": [],
                            "also_buy": [], "rank": f"{rng.randint(1, 99999):,} in {top} (", "main_cat": top,
                            "price": f"${rng.randint(3, 90)}.99"}
            if i % 13 != 6:  # ~8% without a title: dropped for pre-training, kept downstream
                words = [rng.choice(_ADJECTIVES), _TOPICS[topic], f"{_TOPICS[(topic + 1) % len(_TOPICS)]}"]
                if i % 11 == 3:
                    words.insert(1, "&amp; more")  # an HTML entity, unescaped by prepare
                record["title"] = " ".join(words)
            if i % 5 != 2:
                record["brand"] = _BRANDS[(i + c) % len(_BRANDS)]
            if i % 4 != 1:  # ~75% of the items have images
                kind = _failure(category, i, spec)
                first = f"{base}/{kind}/{category}/{asin}.jpg" if kind else f"{base}/img/{category}/{asin}.jpg"
                record["imageURLHighRes"] = [first, f"{base}/img/{category}/{asin}-2.jpg"]
                record["imageURL"] = [f"{base}/img/{category}/{asin}-small.jpg"]
            else:
                record["imageURLHighRes"], record["imageURL"] = [], []
            meta_lines.append(json.dumps(record))
        review_lines = []
        for u in range(spec.users):
            user = f"A{c:02d}{u:05d}{rng.randint(0, 9)}"
            length = 2 if u % 17 == 5 else rng.randint(3, 9)  # a few users below user_k
            current = rng.randrange(spec.items)
            t = 1_400_000_000 + rng.randrange(10**6)
            for k in range(length):
                # Topic-level chain: the next item is usually of the next topic (what pre-training can learn).
                if k:
                    if rng.random() < 0.7:
                        wanted = (topics[current] + 1) % len(_TOPICS)
                        same = [j for j, t_ in enumerate(topics) if t_ == wanted]
                        current = rng.choice(same) if same else rng.randrange(spec.items)
                    else:
                        current = rng.randrange(spec.items)
                t += rng.choice([0, 86400, 3 * 86400])  # some ties, kept in file order
                review = {"overall": float(rng.randint(1, 5)), "verified": True, "reviewerID": user,
                          "asin": _asin(category, current), "reviewerName": f"user {u}",
                          "reviewText": "works as described", "summary": "ok", "unixReviewTime": t}
                review_lines.append(json.dumps(review))
                if k == 1 and u % 29 == 3:  # a repeated review (kept: --duplicates keep)
                    review_lines.append(json.dumps(review))
            if u % 31 == 7:  # a review of an item that has no metadata
                review_lines.append(json.dumps({"overall": 4.0, "reviewerID": user, "asin": f"X{c:02d}{u:07d}",
                                                "unixReviewTime": t + 86400}))
        for name, lines in ((f"{category}_5.json.gz", review_lines), (f"meta_{category}.json.gz", meta_lines)):
            path = raw_dir / name
            tmp = path.with_name(f".{name}.tmp")
            with gzip.open(tmp, "wt", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
            tmp.replace(path)
            written.append(path)
    server = raw_dir / SERVER_FILE
    server.write_text(json.dumps({"port": port}) + "\n")
    return written


def write_tokenizer(raw_dir: str | Path, categories: Sequence[str], out: str | Path) -> Path:
    """A whole-word tokenizer (``reolm.data.tokenizer``, kind ``words``) over the metadata's words."""
    import html

    from reolm.data.tokenizer import train_tokenizer

    def texts() -> Iterator[str]:
        yield "void category title brand"
        for category in categories:
            with gzip.open(Path(raw_dir) / f"meta_{category}.json.gz", "rt", encoding="utf-8") as f:
                for line in f:
                    record = json.loads(line)
                    yield html.unescape(" ".join([" ".join(record.get("category", [])), record.get("title", ""),
                                                  record.get("brand", "")]))
    return train_tokenizer(texts(), out, "words", vocab_size=400, progress=False)


class _Handler(BaseHTTPRequestHandler):
    server_version = "reolm-tiny-images/1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        parts = self.path.strip("/").split("/")
        if len(parts) != 3 or not parts[2].endswith(".jpg") or parts[0] not in ("img", *FAILURE_KINDS):
            self._send(400, b"bad path", "text/plain")
            return
        kind, asin = parts[0], parts[2][:-4].split("-")[0]
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.requests[kind] += 1  # type: ignore[attr-defined]
        if kind == "404":
            self._send(404, b"not found", "text/plain")
        elif kind == "junk":
            self._send(200, b"<html><body>this is not an image</body></html>", "image/jpeg")
        else:
            if kind == "slow":
                time.sleep(SLOW_SECONDS)
            self._send(200, _jpeg(asin), "image/jpeg")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the downloader gave up on a slow answer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
        pass


class ImageServer:
    """The images of the raw files, served on ``127.0.0.1:port`` from a background thread."""

    def __init__(self, port: int = 0) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.requests = {k: 0 for k in ("img", *FAILURE_KINDS)}  # type: ignore[attr-defined]
        self.httpd.lock = threading.Lock()  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="tiny-image-server", daemon=True)

    @property
    def requests(self) -> dict[str, int]:
        return dict(self.httpd.requests)  # type: ignore[attr-defined]

    def __enter__(self) -> "ImageServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ----------------------------------------------------------------------------- the tiny recipe's inputs

TINY_VISION_HIDDEN = 16  # `reolm init vision --hidden`: the image feature size the tiny preset's configs name


def tiny_specs(cfg) -> dict[str, TinyCategorySpec]:
    """Raw files per category of a :class:`reolm.recipe.RecipeConfig`: small pre-training categories,
    slightly larger downstream ones; one timed-out URL in the first of each."""
    specs = {c: TinyCategorySpec(users=100, items=50, slow_urls=int(i == 0))
             for i, c in enumerate(cfg.pretrain_categories)}
    if cfg.dev_category:
        specs[cfg.dev_category] = TinyCategorySpec(users=100, items=50)
    for i, category in enumerate(cfg.downstream.values()):
        specs[category] = TinyCategorySpec(users=150, items=60, slow_urls=int(i == 0))
    return specs


def recorded_port(raw_dir: str | Path) -> int | None:
    try:
        return int(json.loads((Path(raw_dir) / SERVER_FILE).read_text())["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def tiny_input_stages(cfg, port: int) -> list:
    """Stages that make what the user brings to the full recipe: the raw files (images served on
    ``port``), a tokenizer over their words, a random-weight backbone and vision model (``reolm init``)."""
    import sys

    from reolm.pipeline import Stage

    if not cfg.backbone or not cfg.vision:
        raise ValueError("--tiny-inputs makes the backbone and the vision model: set backbone= and vision= to "
                         "the folders to write them to")
    raw, backbone, vision = Path(cfg.raw_dir).resolve(), Path(cfg.backbone).resolve(), Path(cfg.vision).resolve()
    specs = tiny_specs(cfg)
    spec_arg = json.dumps({c: [s.users, s.items, s.slow_urls] for c, s in specs.items()})
    files = [raw / f"{c}_5.json.gz" for c in specs] + [raw / f"meta_{c}.json.gz" for c in specs]
    stages = [
        Stage("tiny inputs: raw Amazon 2018 files (images on 127.0.0.1)",
              [sys.executable, "-m", "reolm.tiny_amazon", "raw", "--out", str(raw), "--port", str(port),
               "--categories", spec_arg], raw / SERVER_FILE, outputs=files),
        # One process for the three (`reolm tokenizer train`, `reolm init backbone`, `reolm init vision`
        # are the same functions): each would import torch and transformers again.
        Stage("tiny inputs: tokenizer, random-weight backbone and vision model (reolm init)",
              [sys.executable, "-m", "reolm.tiny_amazon", "models", "--raw", str(raw), "--backbone", str(backbone),
               "--vision", str(vision), "--categories", *specs],
              vision / "config.json", inputs=[raw / SERVER_FILE], outputs=[backbone]),
    ]
    return stages


@contextlib.contextmanager
def serve_tiny_inputs(cfg, stages: list) -> Iterator[tuple[ImageServer, list]]:
    """Serve the images on 127.0.0.1 (on the port the raw files' URLs name once they exist) and
    yield ``(server, the tiny-input stages + stages)``; the server stops when the block ends."""
    port = recorded_port(cfg.raw_dir) or 0
    try:
        server = ImageServer(port)
    except OSError as err:
        raise OSError(f"cannot serve the tiny inputs' images on 127.0.0.1:{port}, the port their URLs name "
                      f"({Path(cfg.raw_dir) / SERVER_FILE}): {err}; free the port, or delete {cfg.raw_dir} to draw "
                      f"the files again") from None
    with server:
        yield server, tiny_input_stages(cfg, server.port) + list(stages)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m reolm.tiny_amazon", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    raw = sub.add_parser("raw", help="write the raw files")
    raw.add_argument("--out", required=True)
    raw.add_argument("--port", type=int, required=True, help="port of the image server the URLs name")
    raw.add_argument("--categories", required=True, help='JSON {"Category": [users, items, slow_urls]}')
    raw.add_argument("--seed", type=int, default=0)
    models = sub.add_parser("models", help="whole-word tokenizer over the metadata, then a random-weight backbone "
                                           "(reolm init backbone --size tiny) and vision model (reolm init vision)")
    models.add_argument("--raw", required=True)
    models.add_argument("--backbone", required=True)
    models.add_argument("--vision", required=True)
    models.add_argument("--categories", nargs="+", required=True)
    args = parser.parse_args(argv)
    if args.what == "raw":
        specs = {c: TinyCategorySpec(*v) for c, v in json.loads(args.categories).items()}
        for path in write_raw_files(args.out, specs, args.port, args.seed):
            print(f"wrote {path}")
    else:
        from reolm.random_init import init_backbone, init_vision
        tokenizer = write_tokenizer(args.raw, args.categories, Path(args.backbone).parent / "tokenizer")
        print(f"wrote {tokenizer}")
        print(f"wrote {init_backbone(tokenizer, args.backbone, size='tiny', max_position_embeddings=512)}")
        # Written last: its config.json marks the stage done.
        print(f"wrote {init_vision(args.vision, hidden=TINY_VISION_HIDDEN)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
