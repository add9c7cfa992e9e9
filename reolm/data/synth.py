"""Synthetic multi-domain recommendation corpus with learnable, transferable structure.

Why synthetic: tests, CI and the CPU demo need data that (a) looks like the
Amazon processed domains the paper uses (category / title / brand text, ~70%
image coverage, leave-one-out splits) and (b) carries signal that Reo-LM's
ideas can exploit, so that learning curves mean something:

* every item has a latent **topic**; topics share one vocabulary across all
  domains (topic words appear in category and title text), while each domain
  has its own surface nouns and brands, so text transfers only through topics;
* user sequences follow one topic-level **Markov chain shared by every domain**
  (a strong "successor" topic per topic), and within a topic items are drawn
  with a Zipf popularity, so the next item is predictable from the recent
  items' topics, and pre-training on source domains helps a held-out domain;
* for a fraction of the items that have an image, the text hides the topic
  (generic category/title/brand) and only the image (colour = topic hue,
  shape = topic family) reveals it, so image features carry real signal.

Generation is streaming: items and users are produced in chunks with numpy and
written straight into the processed-folder JSON files, so the ``paper`` preset
(3.6M users, 1.02M items, 33.6M interactions) runs in bounded memory.  The
files are byte-identical to what :func:`reolm.data.domain.write_domain` writes
for the same content (tested), and ``domain.json`` is written last.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Sequence

import numpy as np

from reolm.data.domain import DEFAULT_ATTRIBUTES, FORMAT_VERSION
from reolm.io import atomic_open, save_npy, write_json

__all__ = ["DomainSpec", "SynthConfig", "PRESETS", "preset_config", "generate_corpus", "TopicWorld",
           "MIN_SEQ_LEN"]

MIN_SEQ_LEN = 5          # leave-one-out needs >= 3; 5 leaves >= 3 training items per user
USER_CHUNK = 65_536      # users generated and written per numpy batch
ITEM_CHUNK = 65_536

_SYLLABLES = ("ka", "lo", "mi", "ru", "te", "sa", "no", "vi", "da", "pe", "zo", "ri", "ba", "fu", "ge",
              "ha", "jo", "ku", "le", "mo", "ne", "pi", "qu", "sho", "ta", "ve", "wa", "xi", "yu", "ze")
_GENERIC_WORDS = ("classic", "basic", "standard", "essential", "original", "everyday", "universal", "select")
_SHAPES = ("circle", "square", "triangle", "cross")


@dataclass(frozen=True)
class DomainSpec:
    """One domain to generate: its role and its exact sizes."""

    name: str
    role: str            # "pretrain" or "downstream"
    num_users: int
    num_items: int
    num_interactions: int  # train + val + test items over all users
    image_format: str = "png"

    def check(self) -> None:
        if self.num_interactions < MIN_SEQ_LEN * self.num_users:
            raise ValueError(f"domain {self.name}: {self.num_interactions} interactions cannot give "
                             f"{self.num_users} users at least {MIN_SEQ_LEN} items each")
        if self.role not in ("pretrain", "downstream"):
            raise ValueError(f"domain {self.name}: role must be pretrain or downstream, got {self.role!r}")


@dataclass(frozen=True)
class SynthConfig:
    """Everything that determines a synthetic corpus (with the seed)."""

    domains: tuple[DomainSpec, ...]
    num_topics: int = 16
    images: bool = True
    image_size: int = 32
    image_fraction: float = 0.7       # items with an image
    hidden_topic_fraction: float = 0.35  # of imaged items: topic visible only in the image
    successor_prob: float = 0.6       # P(next topic = successor(topic))
    stay_prob: float = 0.2            # P(next topic = topic)
    zipf_exponent: float = 1.0        # item popularity within a topic
    empty_brand_fraction: float = 0.1
    attributes: tuple[str, ...] = DEFAULT_ATTRIBUTES


def _split_exact(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers proportional to ``weights`` summing exactly to ``total`` (largest remainder)."""
    raw = total * np.asarray(weights, dtype=np.float64) / np.sum(weights)
    out = np.floor(raw).astype(np.int64)
    short = total - int(out.sum())
    out[np.argsort(-(raw - out), kind="stable")[:short]] += 1
    return out


def _paper_domains() -> tuple[DomainSpec, ...]:
    """Seven pre-training domains whose totals are exactly the paper's pre-training corpus."""
    names = ("Automotive", "Cell_Phones", "Clothing", "Electronics", "Grocery", "Home", "Movies")
    user_w = np.array([0.10, 0.12, 0.22, 0.20, 0.07, 0.21, 0.08])
    item_w = np.array([0.09, 0.06, 0.30, 0.16, 0.05, 0.26, 0.08])
    avg_len = np.array([8.5, 8.0, 9.0, 10.5, 9.5, 9.2, 10.0])
    users = _split_exact(3_608_532, user_w)
    items = _split_exact(1_022_309, item_w)
    inters = _split_exact(33_572_032, users * avg_len)
    return tuple(DomainSpec(n, "pretrain", int(u), int(i), int(x))
                 for n, u, i, x in zip(names, users, items, inters))


PRESETS: dict[str, SynthConfig] = {
    "tiny": SynthConfig(
        domains=(DomainSpec("Books", "pretrain", 120, 100, 960),
                 DomainSpec("Garden", "pretrain", 120, 100, 960, "jpg"),
                 DomainSpec("Toys", "pretrain", 120, 100, 960),
                 DomainSpec("Scientific", "downstream", 100, 80, 760, "jpg")),
        num_topics=8, image_size=32),
    "demo": SynthConfig(
        domains=(DomainSpec("Books", "pretrain", 2000, 800, 18_000),
                 DomainSpec("Garden", "pretrain", 2000, 800, 18_000, "jpg"),
                 DomainSpec("Toys", "pretrain", 2000, 800, 18_000),
                 DomainSpec("Kitchen", "pretrain", 2000, 800, 18_000, "jpg"),
                 DomainSpec("Scientific", "downstream", 1200, 500, 10_000, "jpg")),
        num_topics=16, image_size=48),
    "paper": SynthConfig(domains=_paper_domains(), num_topics=64, images=False, image_size=48),
}


def preset_config(name: str, images: bool | None = None) -> SynthConfig:
    """The named preset, with images switched on/off when ``images`` is given."""
    if name not in PRESETS:
        raise ValueError(f"unknown synth preset {name!r}; choose from {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    return cfg if images is None else replace(cfg, images=images)


# ----------------------------------------------------------------------------- the shared world

@dataclass
class TopicWorld:
    """Topic vocabulary and topic-transition matrix shared by every domain of a corpus."""

    topic_words: list[tuple[str, str]]   # (category word, title word) per topic
    transition_cdf: np.ndarray           # float64 [T, T] row-wise cumulative transition probs
    successor: np.ndarray                # int [T] the strong successor of each topic
    hues: np.ndarray                     # float [T] image hue per topic

    @property
    def num_topics(self) -> int:
        return len(self.topic_words)

    @classmethod
    def create(cls, cfg: SynthConfig, rng: np.random.Generator) -> "TopicWorld":
        t = cfg.num_topics
        words = _unique_words(rng, 2 * t, syllables=3)
        topic_words = [(words[2 * k], words[2 * k + 1]) for k in range(t)]
        successor = rng.permutation(t)
        successor = np.where(successor == np.arange(t), (successor + 1) % t, successor)
        probs = np.full((t, t), (1.0 - cfg.successor_prob - cfg.stay_prob) / t)
        probs[np.arange(t), successor] += cfg.successor_prob
        probs[np.arange(t), np.arange(t)] += cfg.stay_prob
        cdf = np.cumsum(probs, axis=1)
        cdf[:, -1] = 1.0
        # Hues spread over the colour wheel; shape = topic % 4, so (hue, shape) identifies the topic.
        hues = (np.arange(t) * 0.61803398875) % 1.0
        return cls(topic_words, cdf, successor, hues)

    def next_topics(self, topics: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One Markov step for every entry of ``topics`` (vectorised inverse-CDF sampling)."""
        u = rng.random(len(topics))
        rows = self.transition_cdf[topics]
        return np.minimum((rows < u[:, None]).sum(axis=1), self.num_topics - 1)


def _unique_words(rng: np.random.Generator, n: int, syllables: int) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        word = "".join(_SYLLABLES[i] for i in rng.integers(0, len(_SYLLABLES), syllables))
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out


# ----------------------------------------------------------------------------- items

@dataclass
class _DomainVocab:
    """Surface words of one domain: nouns and per-topic brands (not shared across domains)."""

    nouns: list[str]
    topic_brands: list[list[str]]
    generic_brands: list[str]


def _domain_vocab(rng: np.random.Generator, num_topics: int) -> _DomainVocab:
    words = _unique_words(rng, 8 + 3 * num_topics + 3, syllables=2)
    nouns = words[:8]
    brands = [w.capitalize() + "co" for w in words[8:]]
    topic_brands = [brands[3 * k:3 * k + 3] for k in range(num_topics)]
    return _DomainVocab(nouns, topic_brands, brands[3 * num_topics:])


def _item_text(spec: DomainSpec, world: TopicWorld, vocab: _DomainVocab, topic: int, hidden: bool,
               empty_brand: bool, model_no: int, noun: int, generic: int) -> dict[str, str]:
    """Category / title / brand of one item; ``hidden`` items never mention their topic."""
    domain_title = spec.name.replace("_", " ")
    cat_word, title_word = world.topic_words[topic]
    noun_word = vocab.nouns[noun]
    generic_word = _GENERIC_WORDS[generic]
    if hidden:
        category = f"{domain_title} > General"
        title = f"{generic_word} {noun_word} {model_no:04d}"
        brand = vocab.generic_brands[generic % len(vocab.generic_brands)]
    else:
        category = f"{domain_title} > {cat_word.capitalize()}"
        title = f"{title_word} {cat_word} {noun_word} {model_no:04d}"
        brand = vocab.topic_brands[topic][model_no % 3]
    return {"category": category, "title": title, "brand": "" if empty_brand else brand}


def draw_item_image(topic: int, world: TopicWorld, size: int, rng: np.random.Generator) -> "Any":
    """A small PIL image: background hue and shape encode the topic, position/size jitter is noise."""
    import colorsys

    from PIL import Image, ImageDraw

    r, g, b = colorsys.hsv_to_rgb(float(world.hues[topic]), 0.75, 0.9)
    background = tuple(int(255 * c) for c in (r, g, b))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    half = size // 2
    span = int(size * rng.uniform(0.25, 0.4))
    cx, cy = (half + int(rng.integers(-size // 8, size // 8 + 1)) for _ in range(2))
    box = (cx - span, cy - span, cx + span, cy + span)
    ink = (255, 255, 255) if (topic // len(_SHAPES)) % 2 == 0 else (20, 20, 20)
    shape = _SHAPES[topic % len(_SHAPES)]
    if shape == "circle":
        draw.ellipse(box, fill=ink)
    elif shape == "square":
        draw.rectangle(box, fill=ink)
    elif shape == "triangle":
        draw.polygon([(cx, cy - span), (cx - span, cy + span), (cx + span, cy + span)], fill=ink)
    else:
        w = max(1, span // 3)
        draw.rectangle((cx - w, cy - span, cx + w, cy + span), fill=ink)
        draw.rectangle((cx - span, cy - w, cx + span, cy + w), fill=ink)
    return image


# ----------------------------------------------------------------------------- streaming JSON

class _JsonObjectWriter:
    """Writes ``{"k": v, ...}`` incrementally, byte-identical to ``json.dump`` of the whole dict."""

    def __init__(self, path: Path):
        self._file = contextlib.ExitStack()  # renamed into place by close()
        self.fh: IO[str] = self._file.enter_context(atomic_open(path))
        self.fh.write("{")
        self.first = True

    def write_raw(self, entries: Sequence[str]) -> None:
        """Write pre-rendered ``"key": value`` entries."""
        if not entries:
            return
        if not self.first:
            self.fh.write(", ")
        self.fh.write(", ".join(entries))
        self.first = False

    def close(self) -> None:
        self.fh.write("}")
        self._file.close()


def _render_sequences(users: np.ndarray, flat: np.ndarray, offsets: np.ndarray) -> list[str]:
    """``"u": [i, j, ...]`` entries for a batch of users with ragged item lists."""
    items = flat.tolist()
    bounds = offsets.tolist()
    return [f'"{u}": [{", ".join(map(str, items[bounds[k]:bounds[k + 1]]))}]'
            for k, u in enumerate(users.tolist())]


# ----------------------------------------------------------------------------- one domain

def _sequence_lengths(spec: DomainSpec, rng: np.random.Generator) -> np.ndarray:
    """Per-user lengths >= MIN_SEQ_LEN, heavy-tailed, summing exactly to num_interactions."""
    extra = spec.num_interactions - MIN_SEQ_LEN * spec.num_users
    weights = rng.lognormal(0.0, 1.0, spec.num_users)
    return MIN_SEQ_LEN + rng.multinomial(extra, weights / weights.sum()).astype(np.int64)


def _topic_item_sampler(item_topics: np.ndarray, num_topics: int, zipf: float,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Items grouped by topic with a Zipf popularity inside each topic.

    Returns (items ordered by topic, cdf) where the cdf of topic t occupies
    [t, t+1): ``searchsorted(cdf, t + u)`` then draws an item of topic t.
    """
    order = np.argsort(item_topics, kind="stable")
    order = order[rng.permutation(len(order))]          # popularity rank is random within a topic
    order = order[np.argsort(item_topics[order], kind="stable")]
    counts = np.bincount(item_topics, minlength=num_topics)
    cdf = np.empty(len(order), dtype=np.float64)
    start = 0
    for t, n in enumerate(counts.tolist()):
        if n:
            w = 1.0 / np.arange(1, n + 1) ** zipf
            c = np.cumsum(w) / w.sum()
            c[-1] = 1.0
            cdf[start:start + n] = t + c * (1 - 1e-9)
            start += n
    return order, cdf


def _generate_user_chunk(lengths: np.ndarray, world: TopicWorld, item_order: np.ndarray, cdf: np.ndarray,
                         topic_present: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sequences of a batch of users as (flat items, offsets); work is O(total length)."""
    n = len(lengths)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.empty(int(offsets[-1]), dtype=np.int64)
    by_len = np.argsort(-lengths, kind="stable")      # active users at step k form a prefix
    sorted_len = lengths[by_len]
    present = np.flatnonzero(topic_present)
    topics = present[rng.integers(0, len(present), n)]
    for step in range(int(sorted_len[0]) if n else 0):
        active = int(np.searchsorted(-sorted_len, -step, side="left"))  # users with length > step
        users = by_len[:active]
        if step:
            nxt = world.next_topics(topics[:active], rng)
            # A topic without items in this domain falls back to staying on the current topic.
            topics[:active] = np.where(topic_present[nxt], nxt, topics[:active])
        u = rng.random(active)
        picks = np.searchsorted(cdf, topics[:active] + u, side="right")
        flat[offsets[users] + step] = item_order[np.minimum(picks, len(item_order) - 1)]
    return flat, offsets


def generate_domain(spec: DomainSpec, cfg: SynthConfig, world: TopicWorld, out_dir: Path, seed: int,
                    domain_index: int, progress: bool = True) -> dict[str, Any]:
    """Write one processed domain folder for ``spec``; returns its domain.json content."""
    from tqdm.auto import tqdm

    spec.check()
    rng = np.random.default_rng([seed, 1 + domain_index])
    out_dir.mkdir(parents=True, exist_ok=True)
    done = out_dir / "domain.json"
    if done.exists():
        done.unlink()
    vocab = _domain_vocab(rng, cfg.num_topics)
    short = "".join(ch for ch in spec.name if ch.isalpha())[:3].upper()

    # ---- items: topics, visibility, text, images (streamed in chunks)
    n_items = spec.num_items
    item_topics = rng.integers(0, cfg.num_topics, n_items)
    has_image = rng.random(n_items) < (cfg.image_fraction if cfg.images else 0.0)
    hidden = has_image & (rng.random(n_items) < cfg.hidden_topic_fraction)
    image_dir = out_dir / "images"
    if cfg.images:
        if image_dir.exists():
            shutil.rmtree(image_dir)
        image_dir.mkdir()
    smap_w, meta_w = _JsonObjectWriter(out_dir / "smap.json"), _JsonObjectWriter(out_dir / "meta_data.json")
    bar = tqdm(total=n_items, desc=f"{spec.name}: items", unit="item", disable=not progress, leave=False)
    for lo in range(0, n_items, ITEM_CHUNK):
        hi = min(n_items, lo + ITEM_CHUNK)
        n = hi - lo
        empty_brand = rng.random(n) < cfg.empty_brand_fraction
        model_no = rng.integers(0, 10_000, n)
        noun = rng.integers(0, len(vocab.nouns), n)
        generic = rng.integers(0, len(_GENERIC_WORDS), n)
        smap_entries, meta_entries = [], []
        for k in range(n):
            idx = lo + k
            item_id = f"{short}{idx:07d}"
            attrs = _item_text(spec, world, vocab, int(item_topics[idx]), bool(hidden[idx]),
                               bool(empty_brand[k]), int(model_no[k]), int(noun[k]), int(generic[k]))
            smap_entries.append(f'"{item_id}": {idx}')
            meta_entries.append(f"{json.dumps(item_id)}: {json.dumps(attrs, ensure_ascii=False)}")
            if has_image[idx]:
                image = draw_item_image(int(item_topics[idx]), world, cfg.image_size, rng)
                image.save(image_dir / f"{item_id}.{spec.image_format}",
                           **({"quality": 90} if spec.image_format == "jpg" else {}))
        smap_w.write_raw(smap_entries)
        meta_w.write_raw(meta_entries)
        bar.update(n)
    smap_w.close()
    meta_w.close()
    bar.close()

    # ---- users: topic-Markov sequences, leave-one-out split (streamed in chunks)
    lengths = _sequence_lengths(spec, rng)
    item_order, cdf = _topic_item_sampler(item_topics, cfg.num_topics, cfg.zipf_exponent, rng)
    topic_present = np.bincount(item_topics, minlength=cfg.num_topics) > 0
    writers = {name: _JsonObjectWriter(out_dir / f"{name}.json") for name in ("train", "val", "test", "umap")}
    bar = tqdm(total=spec.num_users, desc=f"{spec.name}: users", unit="user", disable=not progress, leave=False)
    for lo in range(0, spec.num_users, USER_CHUNK):
        hi = min(spec.num_users, lo + USER_CHUNK)
        flat, offsets = _generate_user_chunk(lengths[lo:hi], world, item_order, cdf, topic_present, rng)
        users = np.arange(lo, hi)
        ends = offsets[1:]
        keep = np.ones(len(flat), dtype=bool)
        keep[ends - 1] = False
        keep[ends - 2] = False
        train_offsets = offsets - 2 * np.arange(len(offsets))
        writers["train"].write_raw(_render_sequences(users, flat[keep], train_offsets))
        writers["val"].write_raw([f'"{u}": [{i}]' for u, i in zip(users.tolist(), flat[ends - 2].tolist())])
        writers["test"].write_raw([f'"{u}": [{i}]' for u, i in zip(users.tolist(), flat[ends - 1].tolist())])
        writers["umap"].write_raw([f'"{short}U{u:08d}": {u}' for u in users.tolist()])
        bar.update(hi - lo)
    for w in writers.values():
        w.close()
    bar.close()

    if cfg.images:
        save_npy(out_dir / "has_image.npy", has_image)
    info = {
        "name": spec.name,
        "format_version": FORMAT_VERSION,
        "attributes": list(cfg.attributes),
        "counts": {"users": spec.num_users, "items": n_items, "interactions": spec.num_interactions},
        "role": spec.role,
        "synthetic": {"seed": seed, "domain_index": domain_index, "num_topics": cfg.num_topics,
                      "images": int(has_image.sum()), "hidden_topic_items": int(hidden.sum())},
    }
    write_json(done, info, indent=2)
    return info


def generate_corpus(cfg: SynthConfig, out: str | os.PathLike, seed: int = 0,
                    progress: bool = True) -> list[Path]:
    """Generate every domain of ``cfg`` under ``out/<domain>``; returns the folders in order."""
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = TopicWorld.create(cfg, np.random.default_rng([seed, 0]))
    paths = []
    for d, spec in enumerate(tqdm(cfg.domains, desc="synth domains", unit="domain", disable=not progress)):
        generate_domain(spec, cfg, world, out / spec.name, seed, d, progress)
        paths.append(out / spec.name)
    write_json(out / "corpus.json", {
        "seed": seed, "num_topics": cfg.num_topics, "images": cfg.images,
        "domains": [{"name": s.name, "role": s.role, "users": s.num_users, "items": s.num_items,
                     "interactions": s.num_interactions} for s in cfg.domains],
        "topic_successor": world.successor.tolist(),
    }, indent=2)
    return paths
