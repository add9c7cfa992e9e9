"""save_pretrained / from_pretrained, position table extension, losses and scores."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from reolm.config import ConfigError
from reolm.data.collate import SequenceExample
from reolm.data.tables import load_tokenizer
from reolm.model import CheckpointError, ReoLM
from reolm.model.encoder import training_flops
from tiny_models import save_tiny_checkpoint, tiny_collator, tiny_model_config, tiny_reolm, tiny_tables


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
    tokenizer = load_tokenizer(tmp_path / "hf")
    out_dir = model.save_pretrained(tmp_path / "export", tokenizer)
    assert sorted(p.name for p in out_dir.iterdir()) >= ["config.json", "model.safetensors"]
    # the folder holds the tokenizer's files exactly as the tokenizer writes them itself
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    for path in (tmp_path / "tokenizer").iterdir():
        assert (out_dir / path.name).read_bytes() == path.read_bytes()
    assert not (tmp_path / "export.tmp").exists()
    loaded = ReoLM.from_pretrained(out_dir).eval()
    # the MLM decoder is tied to the word embeddings, stored once
    assert "lm_head.decoder.weight" not in load_file(str(out_dir / "model.safetensors"))
    assert loaded.lm_head.decoder.weight is loaded.embeddings.word_embeddings.weight
    assert loaded.config == model.config
    assert not hasattr(loaded, "tokenizer")  # as in HF, the model holds none: the folder does
    assert load_tokenizer(out_dir).cls_token_id == tokenizer.cls_token_id
    with torch.no_grad():
        a, b = model(batch.history), loaded(batch.history)
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.pooled, b.pooled)
    # run-time overrides, e.g. the attention backend or routing for fine-tuning
    other = ReoLM.from_pretrained(out_dir, overrides={"attention": "sdpa"}).eval()
    with torch.no_grad():
        assert torch.allclose(other(batch.history).hidden, a.hidden, atol=1e-5)


def test_an_export_written_before_the_max_items_rename_loads_upgraded(tmp_path):
    """config.json of an older export says ``max_items``: read back as ``max_history_items`` (with
    and without run-time overrides), same weights, same outputs; a new export writes the new key."""
    save_tiny_checkpoint(tmp_path / "hf", "bert")
    cfg = tiny_model_config(max_history_items=5)
    model = ReoLM.from_backbone(tmp_path / "hf", cfg).eval()
    with torch.no_grad():
        model.embeddings.item_position_embeddings.weight.normal_()  # item positions matter
    out_dir = model.save_pretrained(tmp_path / "export", load_tokenizer(tmp_path / "hf"))
    config = json.loads((out_dir / "config.json").read_text())
    assert config["reolm"]["max_history_items"] == 5 and "max_items" not in config["reolm"]
    config["reolm"] = {("max_items" if k == "max_history_items" else k): v for k, v in config["reolm"].items()}
    (out_dir / "config.json").write_text(json.dumps(config))
    batch = _batch(cfg).history
    for overrides in (None, {"attention": "eager", "gradient_checkpointing": None}):
        loaded = ReoLM.from_pretrained(out_dir, overrides=overrides).eval()
        assert loaded.config == model.config
        assert loaded.embeddings.item_position_embeddings.weight.shape[0] == 6
        with torch.no_grad():
            assert torch.equal(loaded(batch).pooled, model(batch).pooled)
    config["reolm"]["max_history_items"] = 5  # both keys: refused rather than guessed
    (out_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="both set"):
        ReoLM.from_pretrained(out_dir)


def test_from_pretrained_rejects_plain_hf_and_tampered_dirs(tmp_path):
    save_tiny_checkpoint(tmp_path / "hf", "bert")
    with pytest.raises(CheckpointError, match="not a Reo-LM export"):
        ReoLM.from_pretrained(tmp_path / "hf")
    model = ReoLM.from_backbone(tmp_path / "hf", tiny_model_config())
    model.save_pretrained(tmp_path / "export", load_tokenizer(tmp_path / "hf"))
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
    assert batch.history.mlm_positions.numel() > 0
    out = model(batch.history)
    loss = model.mlm_loss(out, batch.history)
    assert loss.dtype == torch.float32 and 2.0 < loss.item() < 10.0  # ~log(120) for a random model
    loss.backward()
    assert model.lm_head.dense.weight.grad.abs().sum() > 0
    assert model.encoder.layer[-1].attention.self.query.weight.grad is None  # head reads the bottom half
    seq, items = model.encode(batch.history), model.encode(batch.target)
    scores = model.score(seq, items)
    assert scores.shape == (2, 2) and scores.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(seq[0], items[1], dim=0)
    assert torch.allclose(scores[0, 1], cos / 0.05, atol=1e-4)
    assert scores.abs().max() <= 1 / 0.05 + 1e-3


def test_mlm_loss_without_masked_tokens_is_zero_and_connected(tmp_path):
    save_tiny_checkpoint(tmp_path, "bert")
    cfg = tiny_model_config()
    model = ReoLM.from_backbone(tmp_path, cfg)
    batch = _batch(cfg).target  # targets are not masked
    loss = model.mlm_loss(model(batch), batch)
    assert loss.item() == 0.0 and loss.requires_grad


def _counted_forward_flops(model: ReoLM, batch, pooled_only: bool) -> int:
    """FLOPs torch's own counter sees in one forward, less the image MLP (which the model's figure
    leaves out: an image token's MLP is ~0.1 % of a real model's per-token cost)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(batch, pooled_only=pooled_only)
    image_mlp = counter.get_flop_counts().get(f"{type(model).__name__}.embeddings.image_mlp", {})
    return counter.get_total_flops() - sum(image_mlp.values())


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_training_flops_equals_torch_flop_counter_on_each_sequence_alone(tmp_path, pooling):
    """The model's figure for a packed batch (with masked tokens) is 3x what torch's FlopCounterMode
    counts when the forward runs on each sequence alone (so attention is counted within each
    sequence, never over padding), plus the MLM head at the masked positions.  With [CLS] pooling
    the last layer runs on the [CLS] rows only (``pooled_only``)."""
    save_tiny_checkpoint(tmp_path, "bert", masked_lm=True)
    cfg = tiny_model_config(pooling=pooling)
    model = ReoLM.from_backbone(tmp_path, cfg).eval()
    pooled_only = pooling == "cls"
    assert model.cls_only_last_layer == pooled_only
    tokens, images = tiny_tables(num_items=20)
    examples = [SequenceExample([1, 2, 3], None, 0), SequenceExample([4], None, 1),
                SequenceExample([5, 6, 7, 8, 9], None, 2)]
    packed = tiny_collator(tokens, images, cfg, mlm_probability=0.3, seed=0)(examples).history
    masked = packed.mlm_positions.shape[0]
    assert masked > 0
    layers, adapters, hidden = 2, 4, 32
    reference = 0
    for example, length in zip(examples, packed.seq_lengths.tolist()):
        alone = tiny_collator(tokens, images, cfg, mlm_probability=0.0)([example]).history
        assert alone.seq_lengths.tolist() == [length]
        # The counter also sees the adapters' bias mixing (routing weights [rows, 4] @ biases [4, 32]:
        # 2*4*32 = 256 FLOPs a row), which the model's figure counts as a bias, i.e. not at all.
        # Rows through the adapters: every token in every layer; a [CLS]-only last layer has one row.
        adapter_rows = (layers - 1) * length + 1 if pooled_only else layers * length
        reference += _counted_forward_flops(model, alone, pooled_only) - 2 * adapters * hidden * adapter_rows
    with torch.no_grad():
        mlm_hidden = model(packed).mlm_hidden
        with FlopCounterMode(display=False) as head:
            model.mlm_logits(mlm_hidden, packed.mlm_positions)
    assert head.get_total_flops() == masked * 2 * (32 * 32 + 32 * 120)  # dense, then the tied decoder
    reference += head.get_total_flops()
    assert model.training_flops(packed, pooled_only=pooled_only) == 3 * reference  # backward = 2x forward
    assert model.training_flops(packed, include_mlm=False, pooled_only=pooled_only) == 3 * (
        reference - head.get_total_flops())


def test_training_flops_counts_real_tokens_only(tmp_path):
    save_tiny_checkpoint(tmp_path, "bert")
    cfg = tiny_model_config()
    model = ReoLM.from_backbone(tmp_path, cfg)
    tokens, images = tiny_tables(num_items=20)
    examples = [SequenceExample([1, 2, 3], None, 0), SequenceExample([4], None, 1)]
    packed = tiny_collator(tokens, images, cfg, mlm_probability=0.0)(examples).history
    padded = tiny_collator(tokens, images, cfg, mlm_probability=0.0, layout="padded")(examples).history
    assert padded.input_ids.shape[0] > packed.input_ids.shape[0]  # the padded stream holds padding
    assert model.training_flops(packed) == model.training_flops(padded)


def test_training_flops_grow_linearly_in_tokens_and_quadratically_in_attention(tmp_path):
    """Counted on paper for the tiny model (hidden 32, FFN 64, 4 adapters of rank 4, 2 layers), in
    matmul FLOPs (2 per multiply-add):
      per token per layer: q, k, v, output 4 * 2*32*32 = 8192; FFN 2 * 2*32*64 = 8192;
      adapters' down + up 2 * 2*32*16 = 2048; total 18432;
      per (query, key) pair per layer: score 2*32 + mixing 2*32 = 128;
      forward + backward = 3 x forward, 2 layers: 110592 a token, 768 a pair.
    One sequence of 10 tokens: 110592*10 + 768*100 = 1182720; doubled to 20 tokens:
    110592*20 + 768*400 = 2519040 (2.13x: the attention quadruples)."""
    model = tiny_reolm(tmp_path)
    flops = functools.partial(training_flops, model.backbone_config, model.config)
    assert flops(10, 10 * 10) == 1182720
    assert flops(20, 20 * 20) == 2519040
    # Doubling one sequence of a batch (10 -> 20 tokens, beside one of 4) adds the same amount.
    assert flops(20 + 4, 20 * 20 + 4 * 4) - flops(10 + 4, 10 * 10 + 4 * 4) == 2519040 - 1182720
    # Through the model's batch interface: a batch's figure is its sequences' figures summed.
    tokens, images = tiny_tables(num_items=20)
    examples = [SequenceExample([1, 2, 3], None, 0), SequenceExample([4], None, 1)]
    collate = tiny_collator(tokens, images, model.config, mlm_probability=0.0)
    both = model.training_flops(collate(examples).history)
    alone = [model.training_flops(collate([e]).history) for e in examples]
    lengths = collate(examples).history.seq_lengths.tolist()
    assert both == sum(alone) == sum(110592 * n + 768 * n * n for n in lengths)
