"""Item images: local directories, img2dataset WebDataset shards, precomputed features."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from conftest import make_domain
from reolm.data.domain import domain_stats, read_domain, write_domain
from reolm.data.images import ImageOptions, ImageSink, from_directory, import_features, normalize_image
from reolm.data.ingest_report import IngestReport

from test_amazon import META, REVIEWS, write_gz


def image_bytes(size: tuple[int, int], fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color=(200, 30, 30, 255)[: len(mode)] if mode != "L" else 128).save(out, fmt)
    return out.getvalue()


def test_normalize_keeps_resizes_and_rejects():
    opts = ImageOptions(max_side=100, min_side=16)
    small = image_bytes((64, 48))
    assert normalize_image(small, opts) == (small, "jpg")  # untouched bytes
    data, ext = normalize_image(image_bytes((400, 200), "PNG"), opts)
    assert ext == "jpg" and Image.open(io.BytesIO(data)).size == (100, 50)
    data, ext = normalize_image(image_bytes((300, 300), "PNG", "RGBA"), opts)
    assert ext == "png" and Image.open(io.BytesIO(data)).size == (100, 100)
    assert normalize_image(image_bytes((8, 40)), opts) == "tiny_image"
    assert normalize_image(b"\xff\xd8\xff\xe0 not really a jpeg", opts) == "corrupt_image"
    assert normalize_image(image_bytes((64, 64))[:200], opts) == "corrupt_image"  # truncated JPEG


def test_images_from_directory(tmp_path):
    domain = make_domain("shop", num_users=5, num_items=6)
    src = tmp_path / "src"
    src.mkdir()
    (src / "shop-i0.jpg").write_bytes(image_bytes((64, 64)))
    (src / "shop-i1.png").write_bytes(image_bytes((1000, 600), "PNG"))
    (src / "shop-i2.jpg").write_bytes(b"garbage")
    (src / "shop-i3.jpg").write_bytes(image_bytes((10, 10)))
    (src / "stranger.jpg").write_bytes(image_bytes((64, 64)))
    (src / "notes.txt").write_text("hi")
    report = IngestReport()
    out = tmp_path / "out"
    sink = ImageSink(out, domain.item_ids(), ImageOptions(max_side=512), report)
    from_directory(src, sink, domain.smap)
    domain.has_image = sink.finish()
    write_domain(domain, out)
    assert domain.has_image.tolist() == [True, True, False, False, False, False]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["shop-i0.jpg", "shop-i1.jpg"]
    assert Image.open(out / "images" / "shop-i1.jpg").size == (512, 307)
    assert dict(report.dropped) == {"corrupt_image": 1, "tiny_image": 1, "image_of_unknown_item": 1,
                                    "not_an_image_file": 1}
    back = read_domain(out)
    assert domain_stats(back)["images"] == 2 and back.image_path("shop-i1").name == "shop-i1.jpg"


def test_prepare_amazon_joins_img2dataset_shards_by_url(tmp_path):
    reviews = write_gz(tmp_path / "r.json.gz", REVIEWS)
    meta = write_gz(tmp_path / "m.json.gz", META)
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    samples = [("https://img/I1.jpg", image_bytes((80, 80))),   # I1 via imageURLHighRes
               ("https://img/I4.jpg", image_bytes((80, 80), "PNG")),
               ("https://img/I5.jpg", b"corrupt bytes"),
               ("https://elsewhere/x.jpg", image_bytes((80, 80)))]
    for shard in range(2):
        with wds.TarWriter(str(shard_dir / f"{shard:05d}.tar")) as sink:
            for k, (url, data) in enumerate(samples[shard * 2:shard * 2 + 2]):
                sink.write({"__key__": f"{shard:05d}{k:04d}", "jpg": data,
                            "json": {"url": url, "status": "success"}})
    out = tmp_path / "Toys"
    result = subprocess.run([sys.executable, "-m", "reolm", "prepare", "amazon", "--reviews", str(reviews),
                             "--meta", str(meta), "--name", "Toys", "--out", str(out), "--user-k", "3",
                             "--item-k", "0", "--image-shards", str(shard_dir / "*.tar")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    domain = read_domain(out)
    assert domain.has_image.tolist() == [True, False, False, True, False]  # I1, I2, I3, I4, I5
    assert sorted(p.name for p in (out / "images").iterdir()) == ["I1.jpg", "I4.png"]
    report = json.loads((out / "domain.json").read_text())["ingest"]["report"]
    assert report["read"]["shard_samples"] == 4 and report["kept"]["images"] == 2
    assert report["dropped"]["corrupt_image"] == 1 and report["dropped"]["shard_url_of_no_item"] == 1


@pytest.fixture
def written_domain(tmp_path):
    domain = make_domain("shop", num_users=5, num_items=6)
    write_domain(domain, tmp_path / "shop")
    return tmp_path / "shop", domain


def test_import_features_by_index_with_zero_rows_as_missing(written_domain, tmp_path):
    path, _ = written_domain
    feats = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    feats[[1, 4]] = 0
    np.save(tmp_path / "f.npy", feats)
    report = import_features(path, tmp_path / "f.npy")
    back = read_domain(path)
    assert back.image_features.dtype == np.float16 and back.image_features.shape == (6, 8)
    assert back.has_image.tolist() == [True, False, True, True, False, True]
    np.testing.assert_allclose(back.image_features[0], feats[0], rtol=1e-3, atol=1e-3)
    assert report.kept["items_with_features"] == 4
    assert json.loads((path / "domain.json").read_text())["image_features"]["dim"] == 8


def test_import_features_by_ids_and_mask(written_domain, tmp_path):
    path, domain = written_domain
    feats = np.arange(4 * 3, dtype=np.float32).reshape(4, 3) + 1
    np.save(tmp_path / "f.npy", feats)
    np.save(tmp_path / "m.npy", np.array([True, True, False, True]))
    (tmp_path / "ids.txt").write_text("shop-i5\nshop-i0\nshop-i2\nghost\n")
    report = import_features(path, tmp_path / "f.npy", tmp_path / "m.npy", tmp_path / "ids.txt")
    back = read_domain(path)
    assert back.has_image.tolist() == [True, False, False, False, False, True]
    assert back.image_features[5].tolist() == [1, 2, 3] and back.image_features[0].tolist() == [4, 5, 6]
    assert not back.image_features[2].any()  # masked out -> void image
    assert report.dropped["feature_row_of_unknown_item"] == 1 and report.dropped["items_without_feature_row"] == 3


def test_import_features_rejects_bad_shapes(written_domain, tmp_path):
    path, _ = written_domain
    np.save(tmp_path / "f.npy", np.ones((5, 4), dtype=np.float32))
    result = subprocess.run([sys.executable, "-m", "reolm", "import", "features", "--domain", str(path),
                             "--features", str(tmp_path / "f.npy")], capture_output=True, text=True)
    assert result.returncode == 1
    assert "f.npy: 5 feature rows for the 6 items of domain 'shop'" in result.stderr
    np.save(tmp_path / "g.npy", np.ones((6, 4), dtype=np.float32))
    np.save(tmp_path / "m.npy", np.ones(5, dtype=bool))
    with pytest.raises(ValueError, match=r"m.npy: mask has shape \(5,\), expected \(6,\)"):
        import_features(path, tmp_path / "g.npy", tmp_path / "m.npy")
    np.save(tmp_path / "h.npy", np.full((6, 4), 1e6, dtype=np.float32))
    with pytest.raises(ValueError, match="row 0 has a value that is not finite or overflows float16"):
        import_features(path, tmp_path / "h.npy")
    assert not (path / "image_features.npy").exists()
