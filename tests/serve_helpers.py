"""Shared pieces of the serving tests: tiny two-tower models and index (``build_assets``) and the
real ``reolm serve`` subprocess (:class:`Server`).

The models are tiny random BERTs with noisy weights (so that items are far apart). The
"fine-tuning run" is written by the trainer's own saver in the trainer's layout: ``stage1/``
(model A, the item encoder that produced the frozen table) and ``best/`` (model B = A moved
by stage 2, holding A's item table), so tests can tell which tower encoded what.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from conftest import make_domain

from reolm.data.domain import read_domain, write_domain
from reolm.data.tables import load_tokenizer
from reolm.data.tokenizer import item_texts, train_tokenizer
from reolm.finetune.config import FinetuneConfig
from reolm.finetune.reolm_recommender import ReoLMRecommender, save_reolm_folder
from reolm.model import ModelConfig, ReoLM
from reolm.random_init import init_backbone
from reolm.serve.config import EmbedConfig
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


def build_assets(root: Path) -> dict:
    """Domain, tokenizer, export, two-stage run and its index folder under ``root``."""
    domain = make_domain(num_items=40)
    rng = np.random.default_rng(0)
    domain.has_image = np.arange(domain.num_items) % 2 == 0
    domain.image_features = (rng.standard_normal((domain.num_items, IMAGE_DIM))
                             * domain.has_image[:, None]).astype(np.float16)
    domain_dir = write_domain(domain, root / "domain")
    tok = train_tokenizer(item_texts([domain_dir]), root / "tok", kind="wordpiece", vocab_size=300)
    backbone = init_backbone(tok, root / "bert", size="tiny", max_position_embeddings=128)
    domain = read_domain(domain_dir)
    model_a, tokenizer = _noisy_model(backbone, seed=1), load_tokenizer(backbone)
    export = model_a.save_pretrained(root / "export", tokenizer)
    model_b = _noisy_model(backbone, seed=2, base=model_a, noise=0.05)
    run = root / "run"
    rec_a = ReoLMRecommender(model_a, tokenizer, progress=False).bind(domain)
    save_reolm_folder(run / "stage1", rec_a, model_name="reolm", domain=domain, cfg=FinetuneConfig(),
                      extra={"stage": 1, "epoch": 1, "val": {}})
    rec_b = ReoLMRecommender(model_b, tokenizer, progress=False).bind(domain)
    rec_b.item_table = rec_a.encode_all_items()  # the frozen table: stage-1 weights' item vectors
    save_reolm_folder(run / "best", rec_b, model_name="reolm", domain=domain, cfg=FinetuneConfig(),
                      extra={"stage": 2, "epoch": 2, "val": {}})
    index = root / "index"
    embed_items(run, domain_dir, index, EmbedConfig(progress=False))
    return {"root": root, "domain_dir": domain_dir, "domain": domain, "export": export, "run": run,
            "index": index, "rec_a": rec_a, "rec_b": rec_b}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``reolm serve`` as a subprocess on a free loopback port."""

    def __init__(self, model: Path, index: Path, log: Path, *overrides: str):
        self.port, self.log = free_port(), log
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


def attrs_of(assets, row: int) -> dict:
    domain = assets["domain"]
    return domain.item_attributes(row)


def object_of(assets, row: int) -> dict:
    obj = {"attributes": attrs_of(assets, row)}
    if assets["domain"].has_image[row]:
        obj["image_feature"] = assets["domain"].image_features[row].astype(float).tolist()
    return obj
