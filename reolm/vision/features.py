"""Image feature table: one pooled vector per item image from a local HF vision checkpoint.

Any checkpoint that ``AutoModel`` + ``AutoImageProcessor`` load works: CLIP /
SigLIP (full or vision-only), BEiT, DINOv2, ViT.  The pooled vector is, in order
of preference: the model's image embedding (``get_image_features`` of a
two-tower model, or ``image_embeds`` of a ``*VisionModelWithProjection``), its
``pooler_output``, else the mean of ``last_hidden_state`` over tokens.

Work is split into **units** (one items shard of a corpus, or a chunk of a
domain's items).  Each finished unit is saved as a partial file
``<table>.partial/unit-%06d.npz`` (written atomically), so an interrupted run
resumes where it stopped.  Under ``torchrun`` every rank takes units
``rank::world_size`` and rank 0 merges the partials once all ranks are done.

Outputs: corpus -> ``CORPUS/tables/images-<key>/`` (an ImageFeatureTable,
rows = global item index); domain -> ``DIR/image_features.npy`` (float16) +
``DIR/has_image.npy`` + ``DIR/image_features.json`` (model key and path).  ``<key>`` is
:func:`~reolm.data.tables.vision_model_key`; both outputs record it with the checkpoint's path,
which is how :mod:`reolm.data.corpus` finds a table and knows which vision model made it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from reolm.data.corpus import image_table_dir
from reolm.data.tables import ImageFeatureTable, TableError, vision_model_key
from reolm.io import atomic_path, save_npy, write_json

if TYPE_CHECKING:
    import torch

__all__ = ["VisionEncoder", "build_image_features"]


def _embedding_model_class(vision_dir: Path) -> Any:
    """The checkpoint's own class when it is an embedding model, e.g. CLIPVisionModelWithProjection.

    ``AutoModel`` maps a CLIP vision config to ``CLIPVisionModel`` and would drop the
    projection head of a ``*WithProjection`` checkpoint; task heads (``*ForImageClassification``)
    are not embedding models, for those ``AutoModel`` gives the right backbone.
    """
    import transformers

    config = json.loads((vision_dir / "config.json").read_text())
    for arch in config.get("architectures") or ():
        if arch.endswith(("Model", "ModelWithProjection")) and hasattr(transformers, arch):
            return getattr(transformers, arch)
    return None


class VisionEncoder:
    """A local HF vision checkpoint + its image processor, producing pooled float32 vectors."""

    def __init__(self, vision_dir: str | os.PathLike, device: str | None = None):
        import torch
        from transformers import AutoImageProcessor, AutoModel

        vision_dir = Path(vision_dir)
        if not (vision_dir / "config.json").is_file():
            raise TableError(f"{vision_dir}: not a Hugging Face model directory (no config.json)")
        if device is None:
            device = rank_device(os.environ, torch.cuda.is_available()) or "cpu"
        self.device = torch.device(device)
        self.processor = AutoImageProcessor.from_pretrained(str(vision_dir), local_files_only=True)
        model_cls = _embedding_model_class(vision_dir) or AutoModel
        self.model = model_cls.from_pretrained(str(vision_dir), local_files_only=True).to(self.device).eval()
        self.key = vision_model_key(vision_dir)
        self.path = vision_dir

    def _pool(self, pixel_values: Any) -> Any:
        if hasattr(self.model, "get_image_features"):      # two-tower CLIP / SigLIP
            out = self.model.get_image_features(pixel_values=pixel_values)
            emb = out if not hasattr(out, "pooler_output") else out.pooler_output
        else:
            out = self.model(pixel_values=pixel_values)
            emb = getattr(out, "image_embeds", None)
            if emb is None:
                emb = getattr(out, "pooler_output", None)
            if emb is None:
                emb = out.last_hidden_state.mean(dim=1)
        return emb.flatten(1)  # convolutional poolers return [B, C, 1, 1]

    def encode(self, images: Sequence[Any]) -> np.ndarray:
        """float32 [len(images), d] pooled vectors of PIL images."""
        import torch

        inputs = self.processor(images=list(images), return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, dtype=next(self.model.parameters()).dtype)
        with torch.inference_mode():
            return self._pool(pixel_values).float().cpu().numpy()

    def dim(self) -> int:
        from PIL import Image

        return int(self.encode([Image.new("RGB", (32, 32))]).shape[1])


def decode_image(data: bytes) -> Any:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


# ----------------------------------------------------------------------------- work units

@dataclass
class _Unit:
    """A resumable slice of the items: its rows and a way to read (row, image bytes) pairs."""

    number: int
    name: str
    rows: int
    read: Callable[[], Iterator[tuple[int, bytes | None]]]


def _corpus_units(corpus: Path) -> tuple[int, list[_Unit]]:
    from reolm.data.shards import iter_tar_samples, load_manifest

    manifest = load_manifest(corpus)

    def reader(path: Path) -> Callable[[], Iterator[tuple[int, bytes | None]]]:
        def read() -> Iterator[tuple[int, bytes | None]]:
            for key, sample in iter_tar_samples(path):
                yield int(key), sample.get("jpg", sample.get("png"))
        return read

    units = [_Unit(n, e["path"], e["count"], reader(corpus / e["path"]))
             for n, e in enumerate(manifest["shards"]["items"])]
    return int(manifest["num_items"]), units


def _domain_units(domain_dir: Path, chunk: int) -> tuple[int, list[_Unit]]:
    from reolm.data.domain import read_item_ids
    from reolm.data.shards import image_files

    ids = read_item_ids(domain_dir)
    files = image_files(domain_dir)

    def reader(lo: int, hi: int) -> Callable[[], Iterator[tuple[int, bytes | None]]]:
        def read() -> Iterator[tuple[int, bytes | None]]:
            for idx in range(lo, hi):
                path = files.get(ids[idx])
                yield idx, _read_image_file(path, idx) if path is not None else None
        return read

    units = [_Unit(n, f"items {lo}..{min(lo + chunk, len(ids)) - 1}", min(lo + chunk, len(ids)) - lo,
                   reader(lo, min(lo + chunk, len(ids))))
             for n, lo in enumerate(range(0, len(ids), chunk))]
    return len(ids), units


def _read_image_file(path: Path, row: int) -> bytes | None:
    """The file's bytes; None (warned, the item counts as having no image) when unreadable."""
    try:
        return path.read_bytes()
    except OSError as err:  # e.g. a broken link, a folder named like an image, no permission
        _warn_unreadable(str(path), row, err)
        return None


def _warn_unreadable(where: str, row: int, err: BaseException) -> None:
    print(f"warning: {where}: item {row}: unreadable image left out ({type(err).__name__}: {err})",
          file=sys.stderr)


def _encode_unit(unit: _Unit, encoder: VisionEncoder, batch_size: int, bar: Any) -> tuple[np.ndarray, np.ndarray]:
    """(rows with an image, float16 features) of one unit; unreadable images count as no image."""
    rows: list[int] = []
    feats: list[np.ndarray] = []
    batch_rows: list[int] = []
    batch_images: list[Any] = []

    def flush() -> None:
        if batch_images:
            feats.append(encoder.encode(batch_images).astype(np.float16))
            rows.extend(batch_rows)
            batch_rows.clear()
            batch_images.clear()

    for row, data in unit.read():
        bar.update(1)
        if data is None:
            continue
        try:
            batch_images.append(decode_image(data))
        except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three on bad files
            _warn_unreadable(unit.name, row, err)
            continue
        batch_rows.append(row)
        if len(batch_images) >= batch_size:
            flush()
    flush()
    return np.asarray(rows, dtype=np.int64), (np.concatenate(feats) if feats else np.zeros((0, 0), np.float16))


def _save_partial(path: Path, rows: np.ndarray, feats: np.ndarray) -> None:
    with atomic_path(path, suffix=".tmp.npz") as tmp:  # np.savez appends .npz to other names
        np.savez(tmp, rows=rows, features=feats)


# ----------------------------------------------------------------------------- distributed helpers

def rank_device(env: Mapping[str, str], cuda_available: bool) -> torch.device | None:
    """This process's GPU under torchrun (``cuda:LOCAL_RANK``), or None without CUDA."""
    import torch

    return torch.device("cuda", int(env.get("LOCAL_RANK", 0))) if cuda_available else None


def process_group_args(env: Mapping[str, str], cuda_available: bool) -> dict[str, Any]:
    """``init_process_group`` arguments: NCCL bound to this rank's GPU (without ``device_id`` NCCL
    guesses the device from the global rank, wrong on every node but the first), else gloo."""
    device = rank_device(env, cuda_available)
    return {"backend": "nccl", "device_id": device} if device is not None else {"backend": "gloo"}


def _dist_context() -> tuple[int, int, Any]:
    """(rank, world size, torch.distributed or None); initialises the group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return 0, 1, None
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        args = process_group_args(os.environ, torch.cuda.is_available())
        if "device_id" in args:
            torch.cuda.set_device(args["device_id"])
        dist.init_process_group(**args)
    return dist.get_rank(), dist.get_world_size(), dist


# ----------------------------------------------------------------------------- the builder

def build_image_features(root: str | os.PathLike, vision_dir: str | os.PathLike, batch_size: int = 64,
                         device: str | None = None, chunk_items: int = 2048,
                         progress: bool = True) -> Path | None:
    """Compute image features of a corpus or domain folder; returns the output path on rank 0."""
    from tqdm.auto import tqdm

    root = Path(root)
    is_corpus = (root / "manifest.json").is_file()
    if not is_corpus and not (root / "smap.json").is_file():
        raise TableError(f"{root} is neither a shard corpus (manifest.json) nor a processed domain folder")
    rank, world, dist = _dist_context()
    encoder = VisionEncoder(vision_dir, device)
    num_items, units = _corpus_units(root) if is_corpus else _domain_units(root, chunk_items)
    final = image_table_dir(root, encoder.key) if is_corpus else root / "image_features.npy"
    partial = (final.with_name(final.name + ".partial") if is_corpus
               else root / f".image_features-{encoder.key}.partial")
    partial.mkdir(parents=True, exist_ok=True)

    mine = [u for u in units[rank::world] if not (partial / f"unit-{u.number:06d}.npz").is_file()]
    bar = tqdm(total=sum(u.rows for u in mine), desc=f"image features (rank {rank})", unit="item",
               disable=not progress or (rank != 0 and world > 1))
    for unit in mine:
        rows, feats = _encode_unit(unit, encoder, batch_size, bar)
        _save_partial(partial / f"unit-{unit.number:06d}.npz", rows, feats)
    bar.close()
    if dist is not None:
        dist.barrier()  # every rank's partial files exist from here on
    out = None
    if rank == 0:
        features, has_image = _merge_partials(partial, units, num_items, encoder)
        if is_corpus:
            out = ImageFeatureTable(features, has_image, encoder.key, str(vision_dir)).save(
                final, extra={"source": str(root)})
        else:
            out = _save_domain_features(root, features, has_image, encoder, vision_dir)
        shutil.rmtree(partial)
    if dist is not None:
        dist.barrier()  # nobody exits (tearing down the group) before rank 0 has merged
        dist.destroy_process_group()
    return out


def _merge_partials(partial: Path, units: list[_Unit], num_items: int,
                    encoder: VisionEncoder) -> tuple[np.ndarray, np.ndarray]:
    parts = []
    for unit in units:
        path = partial / f"unit-{unit.number:06d}.npz"
        if not path.is_file():
            raise TableError(f"{path}: missing partial result of {unit.name}; re-run to resume")
        with np.load(path) as z:
            parts.append((z["rows"], z["features"]))
    dims = {f.shape[1] for r, f in parts if len(r)}
    if len(dims) > 1:
        raise TableError(f"{partial}: partial files disagree on the feature size {sorted(dims)}; "
                         f"delete the folder and rebuild")
    dim = dims.pop() if dims else encoder.dim()
    features = np.zeros((num_items, dim), dtype=np.float16)
    has_image = np.zeros(num_items, dtype=bool)
    for rows, feats in parts:
        features[rows] = feats
        has_image[rows] = True
    return features, has_image


def _save_domain_features(root: Path, features: np.ndarray, has_image: np.ndarray, encoder: VisionEncoder,
                          vision_dir: str | os.PathLike) -> Path:
    save_npy(root / "image_features.npy", features)
    save_npy(root / "has_image.npy", has_image)
    write_json(root / "image_features.json", {
        "key": encoder.key, "vision": str(vision_dir), "dim": int(features.shape[1]),
        "num_with_image": int(has_image.sum()), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return root / "image_features.npy"
