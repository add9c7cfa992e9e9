"""Item index (`reolm embed items`) and the HTTP service (`reolm serve`), end to end on loopback.

Models, index and the server subprocess come from ``serve_helpers`` (tiny random two-tower
run; the real ``reolm serve`` on a free 127.0.0.1 port). Hostile clients and damaged index
folders are in ``test_serve_hostile.py``.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file
from serve_helpers import IMAGE_DIM, Server, build_assets, object_of
from single_thread import one_thread  # noqa: F401  (autouse, module-scoped)

from reolm.finetune.reolm_recommender import load_reolm
from reolm.serve.catalogue import Catalogue
from reolm.serve.config import EmbedConfig, IndexConfig
from reolm.serve.embed import embed_items


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    return build_assets(tmp_path_factory.mktemp("serve"))


def _unit(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).numpy()


# ----------------------------------------------------------------------------- embed items

def test_embed_run_uses_frozen_table_and_records_identity(assets):
    folder = assets["index"]
    manifest = json.loads((folder / "index.json").read_text())
    arrays = load_file(str(folder / manifest["files"]["vectors"]))
    table = assets["rec_b"].item_table
    np.testing.assert_allclose(arrays["vectors"], _unit(table), atol=1e-6)
    cat = Catalogue.open(folder)
    assert cat.ids == assets["domain"].item_ids() and cat.num_items == 40 and bool(arrays["alive"].all())
    model = manifest["model"]
    assert model["item_encoder"]["path"].endswith("stage1") and model["user_encoder"]["path"].endswith("best")
    assert model["item_encoder"]["weights_sha256"] != model["user_encoder"]["weights_sha256"]
    assert model["item_vectors"] == "frozen table (stage-1 weights)"
    assert manifest["tables"]["tokens_key"] == assets["rec_a"].tokens.key and manifest["tables"]["items_with_image"] == 20
    with safe_open(str(folder / manifest["files"]["vectors"]), "np") as f:  # the vectors file names its model
        assert json.loads(f.metadata()["model"]) == model
    # The stage-1 weights reproduce the frozen table: new items land in the same space.
    np.testing.assert_allclose(_unit(assets["rec_a"].encode_all_items()), arrays["vectors"], atol=1e-5)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_embed_export_index_kinds_match_exact_search(assets, kind, tmp_path):
    out = tmp_path / kind
    embed_items(assets["export"], assets["domain_dir"], out, EmbedConfig(index=IndexConfig(kind=kind), progress=False))
    cat = Catalogue.open(out)
    zero_shot = load_reolm(assets["export"])  # model A with the top adapters averaged, as evaluation loads it
    zero_shot.progress = False
    expected = _unit(zero_shot.bind(assets["domain"]).encode_all_items())
    np.testing.assert_allclose(cat.index.vectors(), expected, atol=1e-5)
    assert cat.manifest["model"]["item_vectors"] == "encoded" and cat.index.cfg.kind == kind
    queries = expected[:8]
    exact = np.argsort(-(queries @ expected.T), axis=1, kind="stable")[:, :5]
    hits = cat.search(queries, 5, [set()] * 8)
    recall = np.mean([len({r for r, _ in h} & set(e.tolist())) / 5 for h, e in zip(hits, exact)])
    assert recall == 1.0 if kind == "flat" else recall >= 0.8


def test_embed_command(assets, tmp_path, capsys):
    from reolm.cli import main
    out = tmp_path / "idx"
    assert main(["embed", "items", "--model", str(assets["export"]), "--domain", str(assets["domain_dir"]),
                 "--out", str(out), "--index", "hnsw", "index.hnsw_m=8", "progress=false"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["items"] == 40 and printed["index"] == "hnsw" and printed["model"] == "reolm-zeroshot"
    assert json.loads((out / "index.json").read_text())["index"]["hnsw_m"] == 8
    assert main(["embed", "items", "--model", str(assets["export"]), "--domain", str(assets["domain_dir"]),
                 "--out", str(out), "index.kind=annoy"]) == 1  # a clear config error, no traceback
    assert "index.kind" in capsys.readouterr().err


def test_embed_refuses_a_folder_that_is_not_an_index(assets, tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="not an index folder"):
        embed_items(assets["export"], assets["domain_dir"], tmp_path, EmbedConfig(progress=False))
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_serve_refuses_an_index_of_another_model(assets):
    from reolm.serve.app import open_service
    from reolm.serve.config import ServeConfig
    with pytest.raises(ValueError, match="rebuild it with"):
        open_service(assets["export"], assets["index"], ServeConfig())


# ----------------------------------------------------------------------------- the HTTP service

def _start_server(assets, folder) -> Server:
    """``reolm serve`` of the run on a copy of its index under ``folder`` (``.index``: that copy)."""
    folder.mkdir(parents=True, exist_ok=True)
    index = folder / "index"
    shutil.copytree(assets["index"], index)
    # graceful_timeout_s far below the 600-item add of the SIGTERM test: the running batch must still finish
    srv = Server(assets["run"], index, folder / "server.log", "batch_wait_ms=20", "max_k=100",
                 "max_body_bytes=1000000", "max_items_per_request=2000", "graceful_timeout_s=0.05")
    srv.index = index
    return srv


@pytest.fixture(scope="module")
def server(assets):
    """One server for the tests that change nothing: whatever their order, it holds exactly the 40
    catalogue items (a test that adds, deletes or stops takes a ``fresh_server``)."""
    srv = _start_server(assets, assets["root"] / "read-only")
    yield srv
    srv.stop()


@pytest.fixture
def fresh_server(assets, tmp_path):
    """A server of the test's own, started on the untouched index."""
    srv = _start_server(assets, tmp_path)
    yield srv
    srv.stop()


def _offline_scores(assets, history_rows: list[int]) -> np.ndarray:
    """Evaluation's scores for one history: best/'s history vector against the frozen table."""
    rec = assets["rec_b"]
    with torch.no_grad():
        user = rec.user_vectors([history_rows[-rec.default_max_history:]])
    return rec.model.score(user, rec.item_table)[0].numpy()


def test_health(server):
    health = server.get("/health")
    assert health["items"] == 40 and health["index"]["kind"] == "flat" and health["model"]["kind"] == "reolm"
    assert health["attributes"] == ["category", "title", "brand"] and health["image_feature_dim"] == IMAGE_DIM


def test_recommend_ids_matches_evaluation_scores(server, assets):
    ids = assets["domain"].item_ids()
    history = [3, 8, 13, 18]
    out = server.post("/recommend", {"history": [ids[r] for r in history], "k": 10, "exclude_history": False})
    scores = _offline_scores(assets, history)
    got = [(item["id"], item["score"]) for item in out["items"]]
    assert len(got) == 10
    np.testing.assert_allclose([s for _, s in got], np.sort(scores)[::-1][:10], atol=2e-3)
    np.testing.assert_allclose([s for _, s in got], [scores[ids.index(i)] for i, _ in got], atol=2e-3)
    excluded = server.post("/recommend", {"history": [ids[r] for r in history], "k": 10})
    assert not {i["id"] for i in excluded["items"]} & {ids[r] for r in history}
    assert len(excluded["items"]) == 10


def test_recommend_item_objects_equal_ids(server, assets):
    """The same history as ids, as item objects, and mixed: the same items in the same order,
    evaluation's own ranking of the (unchanged) catalogue."""
    ids = assets["domain"].item_ids()
    history = [5, 10, 16]  # items with and without images
    by_id = server.post("/recommend", {"history": [ids[r] for r in history], "k": 8, "exclude_history": False})
    by_object = server.post("/recommend", {"history": [object_of(assets, r) for r in history], "k": 8})
    mixed = server.post("/recommend", {"history": [ids[5], object_of(assets, 10), ids[16]], "k": 8,
                                       "exclude_history": False})
    expected = [ids[r] for r in np.argsort(-_offline_scores(assets, history), kind="stable")]
    assert [i["id"] for i in by_id["items"]] == expected[:8]
    for other in (by_object, mixed):
        assert [i["id"] for i in other["items"]] == [i["id"] for i in by_id["items"]]
        np.testing.assert_allclose([i["score"] for i in other["items"]], [i["score"] for i in by_id["items"]],
                                   atol=2e-3)


def test_new_item_is_recommended_at_once_in_the_catalogue_space(fresh_server, assets):
    server = fresh_server
    ids = assets["domain"].item_ids()
    twin_of = 7  # same content as catalogue item 7: encoded by the stage-1 tower, it must score like it
    out = server.post("/items", {"items": [{"id": "new-twin", **object_of(assets, twin_of)}]})
    assert out == {"added": 1, "replaced": 0, "items": 41}
    n = server.get("/health")["items"]
    assert n == 41
    rec = server.post("/recommend", {"history": [ids[2], ids[12]], "k": n})
    scores = {i["id"]: i["score"] for i in rec["items"]}
    assert "new-twin" in scores and len(scores) == n - 2
    assert scores["new-twin"] == pytest.approx(scores[ids[twin_of]], abs=2e-3)
    assert server.post("/recommend", {"history": ["new-twin"], "k": 3})["items"]  # usable in a history too
    r = httpx.delete(f"{server.url}/items/new-twin")
    assert r.status_code == 200 and r.json()["items"] == n - 1
    after = server.post("/recommend", {"history": [ids[2]], "k": n - 1})
    assert "new-twin" not in {i["id"] for i in after["items"]}
    assert httpx.delete(f"{server.url}/items/new-twin").status_code == 404


@pytest.mark.parametrize("body,status,field", [
    ({"history": ["no-such-item"], "k": 5}, 422, "history[0]"),
    ({"history": [], "k": 5}, 422, "history"),
    ({"history": ["tiny-i1"], "k": 0}, 422, "k"),
    ({"history": ["tiny-i1"], "k": 101}, 422, "k"),
    ({"history": ["tiny-i1"], "k": 45}, 422, "k"),  # more than the 40 items in the index
    ({"history": [7], "k": 5}, 422, "history[0]"),
    ({"history": [{"attributes": {"colour": "red"}}]}, 422, "history[0].attributes.colour"),
    ({"history": [{"attributes": {"title": "x"}, "image_feature": [1.0, 2.0]}]}, 422, "history[0].image_feature"),
    ({"history": ["tiny-i1"], "k": 5, "user": "u1"}, 422, "user"),
    ({"history": ["tiny-i1"], "pad": "x" * 1_000_001}, 413, "body"),
])
def test_recommend_bad_input(server, body, status, field):
    out = server.post("/recommend", body, status=status)
    assert out["field"] == field and out["error"]


def test_bad_items_and_body(server):
    assert server.post("/items", {"items": [{"id": "a", "attributes": {"title": 3}}]}, 422)["field"] == \
        "items[0].attributes.title"
    assert server.post("/items", {"items": [{"id": "a", "attributes": {}}, {"id": "a", "attributes": {}}]},
                       422)["field"] == "items[1].id"
    assert server.post("/items", {"items": []}, 422)["field"] == "items"
    r = httpx.post(f"{server.url}/recommend", content=b'{"history": [', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == "body"
    chunks = (b'{"history": ["tiny-i1"], "pad": "' + b"x" * 200_000 for _ in range(6))  # no Content-Length
    r = httpx.post(f"{server.url}/recommend", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body"
    assert server.get("/health")["items"] == 40  # nothing half-added


def test_concurrent_adds_and_recommends_lose_nothing(fresh_server, assets):
    server = fresh_server
    ids = assets["domain"].item_ids()
    passes_before = server.get("/metrics")["service"]["encode_passes"]

    async def burst() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            adds = [client.post("/items", json={"items": [{"id": f"c{j}-{m}", **object_of(assets, (3 * j + m) % 40)}
                                                          for m in range(2)]}) for j in range(8)]
            recs = [client.post("/recommend", json={"history": [ids[(j * 7) % 40], ids[(j * 3 + 1) % 40]], "k": 5})
                    for j in range(24)]
            interleaved = [t for j in range(8) for t in (adds[j], *recs[3 * j:3 * j + 3])]
            done = await asyncio.gather(*interleaved)
            return [done[4 * j] for j in range(8)], [r for j in range(8) for r in done[4 * j + 1:4 * j + 4]]

    added, recommended = asyncio.run(burst())
    assert all(r.status_code == 200 for r in added + recommended), \
        [r.text for r in added + recommended if r.status_code != 200]
    assert all(len(r.json()["items"]) == 5 for r in recommended)
    total = server.get("/health")["items"]
    assert total == 40 + 16
    everything = server.post("/recommend", {"history": [ids[0]], "k": total, "exclude_history": False})
    found = {i["id"] for i in everything["items"]}
    assert {f"c{j}-{m}" for j in range(8) for m in range(2)} <= found
    metrics = server.get("/metrics")
    passes = metrics["service"]["encode_passes"] - passes_before
    assert 1 <= passes < 8  # eight concurrent add requests shared forward passes
    assert metrics["requests"]["POST /items"]["status"]["200"] >= 8
    assert metrics["requests"]["POST /recommend"]["latency_ms"]["p99"] > 0


def test_sigterm_finishes_in_flight_request_and_saves(fresh_server, assets):
    """Stops the server in the middle of an add, then restarts it on the saved folder."""
    server = fresh_server
    index, before = server.index, 40
    result: dict = {}

    def add(items: list[dict]) -> None:
        result["response"] = httpx.post(f"{server.url}/items", json={"items": items}, timeout=300)

    # The add is in flight only while its 600 items are encoded (a fraction of a second on the tiny
    # model), so a poll can miss it: then the next bulk is sent, until one is caught in flight.
    for attempt in range(1, 6):
        thread = threading.Thread(target=add, args=([{"id": f"bulk-{j}", **object_of(assets, j % 40)}
                                                     for j in range(600 * (attempt - 1), 600 * attempt)],))
        thread.start()
        while server.get("/metrics")["service"]["in_flight"] < 1 and thread.is_alive():
            time.sleep(0.002)
        if thread.is_alive():
            break
        assert result["response"].status_code == 200, result["response"].text
    else:
        raise AssertionError("5 adds of 600 items each finished before a poll saw them in flight")
    server.proc.send_signal(signal.SIGTERM)
    thread.join(timeout=300)
    assert result["response"].status_code == 200 and result["response"].json()["added"] == 600
    added = 600 * attempt
    assert server.proc.wait(timeout=120) == 0
    log = server.log.read_text()
    assert "InvalidStateError" not in log and "Traceback" not in log
    saved = re.search(r"saved (\d+) changes", log)  # the count of changes, taken before the save reset it
    assert saved and int(saved.group(1)) == added
    manifest = json.loads((index / "index.json").read_text())
    assert manifest["revision"] == 1 and manifest["items"] == before + added
    assert sorted(p.name for p in index.iterdir()) == ["images-000001", "index-000001.faiss", "index.json",
                                                         "tokens-000001", "vectors-000001.safetensors"]
    again = Server(assets["run"], index, index.parent / "restarted.log", "max_k=4000")
    try:
        assert again.get("/health")["items"] == before + added
        ids = assets["domain"].item_ids()
        out = again.post("/recommend", {"history": ["bulk-3", ids[9]], "k": before + added,
                                        "exclude_history": False})
        assert {i["id"] for i in out["items"]} == {f"bulk-{j}" for j in range(added)} | set(ids)
        assert again.post("/admin/save", {})["revision"] == 2
    finally:
        assert again.stop() == 0
