"""save_pretrained / from_pretrained, position table extension, losses and scores."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from reolm.data.collate import SequenceExample
from reolm.model import CheckpointError, ReoLM
from tiny_models import save_tiny_checkpoint, tiny_collator, tiny_model_config, tiny_tables


def _batch(cfg):
    tokens, images = tiny_tables(num_items=20)
    col = tiny_collator(tokens, images, cfg, seed=0)
    return col([SequenceExample([1, 2, 3, 4], 9, 0), SequenceExample([5, 6], 10, 1)])


def test_save_and_load_round_trip_reproduces_outputs(tmp_path):
    save_tiny_checkpoint(tmp_path / "hf", "roberta")
    cfg = tiny_model_config(top_routing="gate", pooling="mean")
    model = ReoLM.from_backbone(tmp_path / "hf", cfg).eval()
    with torch.no_grad():  # move every new parameter away from its initial value
        for name, p in model.named_parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = _batch(cfg)
    out_dir = model.save_pretrained(tmp_path / "export")
    assert sorted(p.name for p in out_dir.iterdir()) >= ["config.json", "model.safetensors"]
    assert (out_dir / "tokenizer_config.json").is_file()
    assert not (tmp_path / "export.tmp").exists()
    loaded = ReoLM.from_pretrained(out_dir).eval()
    # the MLM decoder is tied to the word embeddings, stored once
    assert "lm_head.decoder.weight" not in load_file(str(out_dir / "model.safetensors"))
    assert loaded.lm_head.decoder.weight is loaded.embeddings.word_embeddings.weight
    assert loaded.config == model.config
    assert loaded.tokenizer is not None and loaded.tokenizer.cls_token_id == model.tokenizer.cls_token_id
    with torch.no_grad():
        a, b = model(batch["history"]), loaded(batch["history"])
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.pooled, b.pooled)
    # run-time overrides, e.g. the attention backend or routing for fine-tuning
    other = ReoLM.from_pretrained(out_dir, overrides={"attention": "sdpa"}).eval()
    with torch.no_grad():
        assert torch.allclose(other(batch["history"]).hidden, a.hidden, atol=1e-5)


def test_from_pretrained_rejects_plain_hf_and_tampered_dirs(tmp_path):
    save_tiny_checkpoint(tmp_path / "hf", "bert")
    with pytest.raises(CheckpointError, match="not a Reo-LM export"):
        ReoLM.from_pretrained(tmp_path / "hf")
    model = ReoLM.from_backbone(tmp_path / "hf", tiny_model_config())
    model.save_pretrained(tmp_path / "export")
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    cfg["reolm"]["num_adapters"] = 3
    (tmp_path / "export" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match"):
        ReoLM.from_pretrained(tmp_path / "export")


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_position_table_extension_copies_learned_rows(tmp_path, family):
    hf = save_tiny_checkpoint(tmp_path, family, max_positions=16)
    model = ReoLM.from_backbone(tmp_path, tiny_model_config(max_tokens=40))
    table = model.embeddings.position_embeddings.weight
    old = hf.embeddings.position_embeddings.weight
    offset = 2 if family == "roberta" else 0
    learned = old.shape[0] - offset
    assert table.shape[0] == 40 + offset
    assert torch.equal(table[:16], old)
    for row in range(16, table.shape[0]):
        assert torch.equal(table[row], old[offset + (row - offset) % learned])


def test_mlm_loss_and_scores(tmp_path):
    save_tiny_checkpoint(tmp_path, "bert", masked_lm=True)
    cfg = tiny_model_config()
    model = ReoLM.from_backbone(tmp_path, cfg).train()
    batch = _batch(cfg)
    assert batch["history"]["mlm_positions"].numel() > 0
    out = model(batch["history"])
    loss = model.mlm_loss(out, batch["history"])
    assert loss.dtype == torch.float32 and 2.0 < loss.item() < 10.0  # ~log(120) for a random model
    loss.backward()
    assert model.lm_head.dense.weight.grad.abs().sum() > 0
    assert model.encoder.layer[-1].attention.self.query.weight.grad is None  # head reads the bottom half
    seq, items = model.encode(batch["history"]), model.encode(batch["target"])
    scores = model.score(seq, items)
    assert scores.shape == (2, 2) and scores.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(seq[0], items[1], dim=0)
    assert torch.allclose(scores[0, 1], cos / 0.05, atol=1e-4)
    assert scores.abs().max() <= 1 / 0.05 + 1e-3


def test_mlm_loss_without_masked_tokens_is_zero_and_connected(tmp_path):
    save_tiny_checkpoint(tmp_path, "bert")
    cfg = tiny_model_config()
    model = ReoLM.from_backbone(tmp_path, cfg)
    batch = _batch(cfg)["target"]  # targets are not masked
    loss = model.mlm_loss(model(batch), batch)
    assert loss.item() == 0.0 and loss.requires_grad


def test_training_flops_counts_real_tokens_only(tmp_path):
    save_tiny_checkpoint(tmp_path, "bert")
    cfg = tiny_model_config()
    model = ReoLM.from_backbone(tmp_path, cfg)
    tokens, images = tiny_tables(num_items=20)
    examples = [SequenceExample([1, 2, 3], None, 0), SequenceExample([4], None, 1)]
    packed = tiny_collator(tokens, images, cfg, mlm_probability=0.0)(examples)["history"]
    padded = tiny_collator(tokens, images, cfg, mlm_probability=0.0, layout="padded")(examples)["history"]
    assert model.training_flops(packed) == model.training_flops(padded)
    lengths = packed["seq_lengths"].tolist()
    h, inner, layers = 32, 64, 2
    per_token = 4 * h * h + 2 * h * inner + 2 * h * 4 * 4
    expected = 3 * layers * (2 * per_token * sum(lengths) + 4 * h * sum(n * n for n in lengths))
    assert model.training_flops(packed) == expected
