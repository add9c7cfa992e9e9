"""The [CLS]-only last layer (``forward(pooled_only=True)``) against the full computation."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from reolm.data.collate import SequenceExample
from reolm.model import ReoLM
from tiny_models import save_tiny_checkpoint, tiny_collator, tiny_model_config, tiny_tables


def _trained_looking(tmp_path, layers=4, **overrides) -> ReoLM:
    """A tiny model whose adapters, gates, token types and item positions are all non-zero."""
    save_tiny_checkpoint(tmp_path, "bert", layers=layers)
    model = ReoLM.from_backbone(tmp_path, tiny_model_config(**overrides))
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in model.encoder.layer:
            for p in (layer.adapter.up_weight, layer.adapter.up_bias, layer.adapter.gate.weight):
                p.normal_(std=0.3)
        model.embeddings.item_position_embeddings.weight.normal_(std=0.3)
        model.embeddings.token_type_embeddings.weight.normal_(std=0.3)
    return model


def _batch(model, layout="packed", mlm=0.0):
    tokens, images = tiny_tables(30)
    collate = tiny_collator(tokens, images, model.config, layout=layout, mlm_probability=mlm, seed=0)
    examples = [SequenceExample([1, 2, 3, 4, 5], domain=0), SequenceExample([7], domain=1),
                SequenceExample([9, 10, 11], domain=2), SequenceExample([12, 13], domain=1)]
    return collate(examples).history, collate.collate_items([0, 5, 17, 29, 3])


@pytest.mark.parametrize("layout,backend", [("packed", "eager"), ("packed", "sdpa"), ("padded", "sdpa")])
@pytest.mark.parametrize("routing", ["gate", "domain"])
def test_pooled_only_equals_full_last_layer_in_float64(tmp_path, layout, backend, routing):
    model = _trained_looking(tmp_path, attention=backend).double().eval()
    model.set_routing(routing)
    assert model.cls_only_last_layer
    for batch in _batch(model, layout):
        with torch.no_grad():
            full, cls = model(batch), model(batch, pooled_only=True)
        assert cls.hidden is None and full.hidden is not None
        assert torch.allclose(cls.pooled, full.pooled, atol=1e-12, rtol=0)
        assert not torch.allclose(full.pooled[0], full.pooled[1], atol=1e-3)  # sequences differ
        assert torch.equal(cls.mlm_hidden, full.mlm_hidden)  # the MLM path (bottom layers) is unchanged


def test_gradients_and_mlm_loss_match_the_full_computation(tmp_path):
    model = _trained_looking(tmp_path, attention="sdpa").double().train()
    history, items = _batch(model, mlm=0.5)
    assert history.mlm_positions.shape[0] > 0

    def grads(pooled_only):
        model.zero_grad()
        out = model(history, pooled_only=pooled_only)
        item_vecs = model(items, pooled_only=pooled_only).pooled
        loss = model.score(out.pooled, item_vecs).logsumexp(1).mean() + model.mlm_loss(out, history)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (loss_full, g_full), (loss_cls, g_cls) = grads(False), grads(True)
    assert torch.allclose(loss_cls, loss_full, atol=1e-12, rtol=0)
    assert g_full.keys() == g_cls.keys()
    for name in g_full:
        assert torch.allclose(g_cls[name], g_full[name], atol=1e-10, rtol=0), name
    assert g_full["encoder.layer.3.intermediate.dense.weight"].abs().sum() > 0


def test_mean_pooling_or_the_setting_off_keep_the_full_last_layer(tmp_path):
    for name, overrides in (("mean", {"pooling": "mean"}), ("off", {"cls_only_last_layer": False})):
        model = _trained_looking(tmp_path / name, **overrides).eval()
        assert not model.cls_only_last_layer
        history, _ = _batch(model)
        with torch.no_grad():
            out = model(history, pooled_only=True)
            assert out.hidden is not None and torch.equal(out.pooled, model(history).pooled)


def test_training_flops_follow_the_measured_matmul_flops(tmp_path):
    """FLOPs counted by torch's FlopCounterMode on the forward shrink as training_flops says."""
    model = _trained_looking(tmp_path, attention="eager").eval()
    history, items = _batch(model)
    for batch in (history, items):
        measured = {}
        for pooled_only in (False, True):
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(batch, pooled_only=pooled_only)
            measured[pooled_only] = counter.get_total_flops()
        predicted = {p: model.training_flops(batch, include_mlm=False, pooled_only=p) for p in (False, True)}
        assert measured[True] < 0.9 * measured[False]
        assert measured[True] / measured[False] == pytest.approx(predicted[True] / predicted[False], rel=0.05)
