from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reolm.cli import main
from reolm.data.domain import read_domain
from reolm.data.shards import ShardOptions, iter_items, load_manifest, write_corpus
from reolm.data.synth import generate_corpus, preset_config
from reolm.data.corpus import find_image_table
from reolm.data.tables import ImageFeatureTable, vision_model_key
from reolm.vision.features import VisionEncoder, decode_image

DOMAINS = ("Garden", "Scientific")


def _save_vit(path: Path) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _save_clip_vision(path: Path) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=64,
                                                   projection_dim=24)).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vision")
    generate_corpus(preset_config("tiny"), root / "synth", seed=4, progress=False)
    write_corpus([root / "synth" / d for d in DOMAINS], root / "corpus", ShardOptions(max_count=40, progress=False))
    return {"synth": root / "synth", "corpus": root / "corpus", "vit": _save_vit(root / "vit"),
            "clip": _save_clip_vision(root / "clip")}


@pytest.mark.parametrize("model, dim", [("vit", 32), ("clip", 24)])
def test_corpus_table_rows_equal_direct_model_output(data, model, dim):
    assert main(["tables", "images", "--vision", str(data[model]), "--corpus", str(data["corpus"]),
                 "--batch-size", "7", "--quiet"]) == 0
    table = find_image_table(data["corpus"], data[model])
    manifest = load_manifest(data["corpus"])
    assert table.features.dtype == np.float16 and table.features.shape == (manifest["num_items"], dim)
    items = list(iter_items(data["corpus"], with_images=True))
    np.testing.assert_array_equal(table.has_image, [r["image"] is not None for r in items])
    assert table.has_image.sum() == manifest["totals"]["images"]
    enc = VisionEncoder(data[model], "cpu")
    rows = [r["index"] for r in items if r["image"]]
    direct = enc.encode([decode_image(items[i]["image"][1]) for i in rows])  # one batch, not 7
    np.testing.assert_allclose(table.features[rows].astype(np.float32), direct, rtol=1e-2, atol=1e-3)
    assert not table.features[~np.asarray(table.has_image)].any()
    if model == "clip":  # image_embeds (projection), not the 32-wide pooler
        from transformers import CLIPVisionModelWithProjection
        m = CLIPVisionModelWithProjection.from_pretrained(data[model]).eval()
        pv = enc.processor(images=[decode_image(items[rows[0]]["image"][1])], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            ref = m(pixel_values=pv).image_embeds[0].numpy()
        np.testing.assert_allclose(table.features[rows[0]].astype(np.float32), ref, rtol=1e-2, atol=1e-3)


def test_domain_features_and_resume(data, tmp_path):
    import shutil
    dom = tmp_path / "Garden"
    shutil.copytree(data["synth"] / "Garden", dom)
    key = vision_model_key(data["vit"])
    # a "crashed" earlier run left unit 0 finished: its rows must be reused, not recomputed
    partial = dom / f".image_features-{key}.partial"
    partial.mkdir()
    np.savez(partial / "unit-000000.npz", rows=np.array([0, 1]), features=np.full((2, 32), 7, np.float16))
    assert main(["tables", "images", "--vision", str(data["vit"]), "--domain", str(dom),
                 "--units-per-chunk", "16", "--quiet"]) == 0
    d = read_domain(dom)
    assert d.image_features.shape == (d.num_items, 32) and not partial.exists()
    assert (d.image_features[:2] == 7).all()
    synth_has = np.load(data["synth"] / "Garden" / "has_image.npy")
    np.testing.assert_array_equal(d.has_image[16:], synth_has[16:])
    enc = VisionEncoder(data["vit"], "cpu")
    ids = d.item_ids()
    rows = [i for i in range(16, d.num_items) if synth_has[i]][:5]
    direct = enc.encode([decode_image(d.image_path(ids[i]).read_bytes()) for i in rows])
    np.testing.assert_allclose(d.image_features[rows].astype(np.float32), direct, rtol=1e-2, atol=1e-3)


@pytest.mark.slow
def test_torchrun_two_ranks_match_single_process(data, tmp_path):
    import shutil
    corpus = tmp_path / "corpus"
    shutil.copytree(data["corpus"], corpus, ignore=shutil.ignore_patterns("tables"))
    with socket.socket() as sock:  # a free port: other test runs may share this machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "reolm", "tables", "images", "--vision", str(data["vit"]), "--corpus", str(corpus), "--quiet"]
    subprocess.run(cmd, check=True, env=env, timeout=240, capture_output=True)
    two = find_image_table(corpus, data["vit"])
    main(["tables", "images", "--vision", str(data["vit"]), "--corpus", str(data["corpus"]), "--quiet"])
    one = find_image_table(data["corpus"], data["vit"])
    np.testing.assert_array_equal(np.asarray(two.has_image), np.asarray(one.has_image))
    np.testing.assert_allclose(np.asarray(two.features, np.float32), np.asarray(one.features, np.float32),
                               atol=1e-3)
    assert isinstance(two, ImageFeatureTable)


def test_each_rank_binds_its_own_gpu_for_nccl():
    """Under torchrun the process group is NCCL bound to cuda:LOCAL_RANK (also the encoder's
    default device); without CUDA gloo, unbound.  Resolving needs no GPU."""
    from reolm.vision.features import process_group_args, rank_device

    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}
    assert process_group_args(env, cuda_available=True) == {"backend": "nccl", "device_id": torch.device("cuda", 1)}
    assert rank_device(env, cuda_available=True) == torch.device("cuda:1")  # the local rank, not the global one
    assert process_group_args(env, cuda_available=False) == {"backend": "gloo"}
    assert rank_device({}, cuda_available=False) is None
