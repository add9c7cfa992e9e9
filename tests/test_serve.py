"""Item index (`reolm embed items`) and the HTTP service (`reolm serve`), end to end on loopback.

The models are tiny random BERTs with noisy weights (so that items are far apart). The
"fine-tuning run" is written by the trainer's own saver in the trainer's layout: ``stage1/``
(model A, the item encoder that produced the frozen table) and ``best/`` (model B = A moved
by stage 2, holding A's item table), so tests can tell which tower encoded what. The server
is the real ``reolm serve`` subprocess on a free 127.0.0.1 port.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import make_domain
from safetensors import safe_open
from safetensors.numpy import load_file
from single_thread import one_thread  # noqa: F401  (autouse, module-scoped)

from reolm.data.domain import read_domain, write_domain
from reolm.data.tokenizer import item_texts, train_tokenizer
from reolm.finetune.config import FinetuneConfig
from reolm.finetune.reolm_recommender import ReoLMRecommender, load_reolm, save_reolm_folder
from reolm.model import ModelConfig, ReoLM
from reolm.random_init import init_backbone
from reolm.serve.catalogue import Catalogue
from reolm.serve.config import EmbedConfig, IndexConfig
from reolm.serve.embed import embed_items

REPO = Path(__file__).resolve().parents[1]
IMAGE_DIM = 8


def _noisy_model(backbone: Path, seed: int, base: ReoLM | None = None, noise: float = 0.2) -> ReoLM:
    cfg = ModelConfig(num_adapters=2, adapter_rank=4, image_feature_dim=IMAGE_DIM, max_tokens=128,
                      attention="sdpa", hidden_dropout=0.0, attention_dropout=0.0, top_routing="gate")
    model = ReoLM.from_backbone(backbone, cfg).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        if base is not None:
            model.load_state_dict(base.state_dict())
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serve")
    domain = make_domain(num_items=40)
    rng = np.random.default_rng(0)
    domain.has_image = np.arange(domain.num_items) % 2 == 0
    domain.image_features = (rng.standard_normal((domain.num_items, IMAGE_DIM))
                             * domain.has_image[:, None]).astype(np.float16)
    domain_dir = write_domain(domain, root / "domain")
    tok = train_tokenizer(item_texts([domain_dir]), root / "tok", kind="wordpiece", vocab_size=300)
    backbone = init_backbone(tok, root / "bert", size="tiny", max_position_embeddings=128)
    domain = read_domain(domain_dir)
    model_a = _noisy_model(backbone, seed=1)
    export = model_a.save_pretrained(root / "export")
    model_b = _noisy_model(backbone, seed=2, base=model_a, noise=0.05)
    run = root / "run"
    rec_a = ReoLMRecommender(model_a, progress=False).bind_domain(domain)
    save_reolm_folder(run / "stage1", rec_a, model_name="reolm", domain=domain, cfg=FinetuneConfig(),
                      extra={"stage": 1, "epoch": 1, "val": {}})
    rec_b = ReoLMRecommender(model_b, progress=False).bind_domain(domain)
    rec_b.item_table = rec_a.encode_all_items()  # the frozen table: stage-1 weights' item vectors
    save_reolm_folder(run / "best", rec_b, model_name="reolm", domain=domain, cfg=FinetuneConfig(),
                      extra={"stage": 2, "epoch": 2, "val": {}})
    index = root / "index"
    embed_items(run, domain_dir, index, EmbedConfig(progress=False))
    return {"root": root, "domain_dir": domain_dir, "domain": domain, "export": export, "run": run,
            "index": index, "rec_a": rec_a, "rec_b": rec_b}


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
    expected = _unit(zero_shot.bind_domain(assets["domain"]).encode_all_items())
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

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``reolm serve`` as a subprocess on a free loopback port."""

    def __init__(self, model: Path, index: Path, log: Path, *overrides: str):
        self.port, self.log = _free_port(), log
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "reolm", "serve", "--model", str(model), "--index",
                                      str(index), "--host", "127.0.0.1", "--port", str(self.port), *overrides],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 300  # seconds on an idle machine; minutes on a loaded one
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)
        self.stop()
        raise AssertionError(f"server did not answer /health:\n{log.read_text()[-3000:]}")

    def get(self, path: str) -> dict:
        r = httpx.get(self.url + path, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def post(self, path: str, body: object, status: int = 200) -> dict:
        r = httpx.post(self.url + path, json=body, timeout=60)
        assert r.status_code == status, r.text
        return r.json()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(assets):
    index = assets["root"] / "served-index"
    shutil.copytree(assets["index"], index)
    srv = Server(assets["run"], index, assets["root"] / "server.log", "batch_wait_ms=20", "max_k=100",
                 "max_body_bytes=1000000", "max_items_per_request=2000")
    srv.index = index
    yield srv
    srv.stop()


def _offline_scores(assets, history_rows: list[int]) -> np.ndarray:
    """Evaluation's scores for one history: best/'s history vector against the frozen table."""
    rec = assets["rec_b"]
    with torch.no_grad():
        user = rec.user_vectors([history_rows[-rec.default_max_history:]])
    return rec.model.score(user, rec.item_table)[0].numpy()


def _attrs(assets, row: int) -> dict:
    domain = assets["domain"]
    return domain.item_attributes(row)


def _object(assets, row: int) -> dict:
    obj = {"attributes": _attrs(assets, row)}
    if assets["domain"].has_image[row]:
        obj["image_feature"] = assets["domain"].image_features[row].astype(float).tolist()
    return obj


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
    ids = assets["domain"].item_ids()
    history = [5, 10, 16]  # items with and without images
    by_id = server.post("/recommend", {"history": [ids[r] for r in history], "k": 8, "exclude_history": False})
    by_object = server.post("/recommend", {"history": [_object(assets, r) for r in history], "k": 8})
    mixed = server.post("/recommend", {"history": [ids[5], _object(assets, 10), ids[16]], "k": 8,
                                       "exclude_history": False})
    for other in (by_object, mixed):
        np.testing.assert_allclose([i["score"] for i in other["items"]], [i["score"] for i in by_id["items"]],
                                   atol=2e-3)


def test_new_item_is_recommended_at_once_in_the_catalogue_space(server, assets):
    ids = assets["domain"].item_ids()
    twin_of = 7  # same content as catalogue item 7: encoded by the stage-1 tower, it must score like it
    out = server.post("/items", {"items": [{"id": "new-twin", **_object(assets, twin_of)}]})
    assert out == {"added": 1, "replaced": 0, "items": 41}
    n = server.get("/health")["items"]
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


def test_concurrent_adds_and_recommends_lose_nothing(server, assets):
    ids = assets["domain"].item_ids()
    before = server.get("/health")["items"]
    passes_before = server.get("/metrics")["service"]["encode_passes"]

    async def burst() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            adds = [client.post("/items", json={"items": [{"id": f"c{j}-{m}", **_object(assets, (3 * j + m) % 40)}
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
    assert total == before + 16
    everything = server.post("/recommend", {"history": [ids[0]], "k": total, "exclude_history": False})
    found = {i["id"] for i in everything["items"]}
    assert {f"c{j}-{m}" for j in range(8) for m in range(2)} <= found
    metrics = server.get("/metrics")
    passes = metrics["service"]["encode_passes"] - passes_before
    assert 1 <= passes < 8  # eight concurrent add requests shared forward passes
    assert metrics["requests"]["POST /items"]["status"]["200"] >= 8
    assert metrics["requests"]["POST /recommend"]["latency_ms"]["p99"] > 0


def test_sigterm_finishes_in_flight_request_and_saves(server, assets):
    """Last test of the module: stops the shared server, then restarts it on the saved folder."""
    index, before = server.index, server.get("/health")["items"]
    items = [{"id": f"bulk-{j}", **_object(assets, j % 40)} for j in range(600)]
    result: dict = {}

    def add() -> None:
        result["response"] = httpx.post(f"{server.url}/items", json={"items": items}, timeout=300)

    thread = threading.Thread(target=add)
    thread.start()
    deadline = time.time() + 120
    while server.get("/metrics")["service"]["in_flight"] < 1:  # the add is being worked on
        assert time.time() < deadline and thread.is_alive(), "the add finished before it could be interrupted"
        time.sleep(0.005)
    server.proc.send_signal(signal.SIGTERM)
    thread.join(timeout=300)
    assert result["response"].status_code == 200 and result["response"].json()["added"] == 600
    assert server.proc.wait(timeout=120) == 0
    manifest = json.loads((index / "index.json").read_text())
    assert manifest["revision"] == 1 and manifest["items"] == before + 600
    assert sorted(p.name for p in index.iterdir()) == ["images-000001", "index-000001.faiss", "index.json",
                                                         "tokens-000001", "vectors-000001.safetensors"]
    again = Server(assets["run"], index, assets["root"] / "restarted.log", "max_k=1000")
    try:
        assert again.get("/health")["items"] == before + 600
        ids = assets["domain"].item_ids()
        out = again.post("/recommend", {"history": ["bulk-3", "c0-1", ids[9]], "k": before + 600,
                                        "exclude_history": False})
        assert {f"bulk-{j}" for j in range(600)} | {"c0-1"} <= {i["id"] for i in out["items"]}
        assert again.post("/admin/save", {})["revision"] == 2
    finally:
        assert again.stop() == 0
