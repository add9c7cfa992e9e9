"""Mixture of adapters (exact PLM at start, routing) and image tokens."""

from __future__ import annotations

import pytest
import torch

from reolm.data.collate import SequenceExample, pack_token_sequences, split_sequences
from reolm.model import MixtureOfAdapters
from tiny_models import save_tiny_checkpoint, tiny_collator, tiny_model_config, tiny_reolm, tiny_tables
from reolm.model import ReoLM

SEQS = [[2, 10, 11, 12], [2, 20, 21, 22, 23, 24], [2, 30, 31, 32, 33]]


def _model(tmp_path, layers=4, **overrides):
    hf = save_tiny_checkpoint(tmp_path, "bert", layers=layers)
    return hf, ReoLM.from_backbone(tmp_path, tiny_model_config(**overrides)).eval()


def _hidden(model, domains):
    """Per-example hidden states."""
    batch = pack_token_sequences(SEQS, domains=domains)
    with torch.no_grad():
        return split_sequences(model(batch).hidden, batch)


def _changed(after, before):
    return [not torch.allclose(a, b, atol=1e-6) for a, b in zip(after, before)]


def test_fresh_model_computes_the_plm_in_every_routing_mode(tmp_path):
    hf, model = _model(tmp_path)
    # Token types and item positions of a real batch must not matter at the start either.
    types = [[0] + [1 + i % 3 for i in range(len(s) - 1)] for s in SEQS]
    items = [[0] + [1 + i // 2 for i in range(len(s) - 1)] for s in SEQS]
    with torch.no_grad():
        ref = torch.cat([hf(torch.tensor([s])).last_hidden_state[0] for s in SEQS])
        from reolm.model.encoder import TOP_ROUTINGS
        assert set(TOP_ROUTINGS) == {"domain", "gate", "mean"}
        for mode in TOP_ROUTINGS:
            model.set_routing(mode)
            batch = pack_token_sequences(SEQS, types, items, domains=[0, 1, 2])
            out = torch.cat(split_sequences(model(batch).hidden, batch))
            assert torch.allclose(out, ref, atol=1e-5, rtol=0), mode


def test_domain_routing_changes_only_the_routed_domain(tmp_path):
    _, model = _model(tmp_path)
    before = _hidden(model, [0, 1, 2])
    top = model.encoder.layer[-1].adapter
    with torch.no_grad():
        top.up_weight[1].normal_(std=0.5)
    assert _changed(_hidden(model, [0, 1, 2]), before) == [False, True, False]


def test_bottom_layers_average_all_adapters(tmp_path):
    _, model = _model(tmp_path)
    before = _hidden(model, [0, 1, 2])
    with torch.no_grad():
        model.encoder.layer[0].adapter.up_weight[3].normal_(std=0.5)  # domain 3 is in no sequence
    assert _changed(_hidden(model, [0, 1, 2]), before) == [True, True, True]


def test_gate_weights_sum_to_one_and_gate_mode_mixes_adapters(tmp_path):
    adapter = MixtureOfAdapters(hidden=16, num_adapters=5, rank=3, scale=2.0, activation="gelu")
    x = torch.randn(11, 16)
    w = adapter.routing_weights(x, "gate")
    assert w.shape == (11, 5) and torch.allclose(w.sum(-1), torch.ones(11), atol=1e-6)
    assert (w > 0).all()
    assert torch.allclose(adapter.routing_weights(x, "mean"), torch.full((11, 5), 0.2))
    domains = torch.tensor([0, 4, 2] + [1] * 8)
    onehot = adapter.routing_weights(x, "domain", domains)
    assert onehot.argmax(-1).tolist() == domains.tolist() and torch.equal(onehot.sum(-1), torch.ones(11))
    # Output: scale * sum_a w_a * up_a(act(down x)) — checked against a per-adapter loop.
    with torch.no_grad():
        adapter.up_weight.normal_()
        adapter.up_bias.normal_()
    z = torch.nn.functional.gelu(adapter.down(x)).view(11, 5, 3)
    for mode, kwargs in (("gate", {}), ("domain", {"token_domains": domains}), ("mean", {})):
        weights = adapter.routing_weights(x, mode, **kwargs)
        expected = 2.0 * sum(weights[:, a:a + 1] * (z[:, a] @ adapter.up_weight[a] + adapter.up_bias[a])
                             for a in range(5))
        assert torch.allclose(adapter(x, mode, **kwargs), expected, atol=1e-5), mode


def test_gate_routing_ignores_domains(tmp_path):
    _, model = _model(tmp_path, top_routing="gate")
    with torch.no_grad():
        model.encoder.layer[-1].adapter.up_weight.normal_(std=0.5)
    a = _hidden(model, [0, 1, 2])
    b = _hidden(model, [3, 3, 3])
    assert _changed(a, b) == [False, False, False]
    model.set_routing("domain")
    assert _changed(_hidden(model, [0, 1, 2]), a) == [True, True, True]


def test_image_feature_changes_only_sequences_containing_the_item(tmp_path):
    _, model = _model(tmp_path, layers=2)
    tokens, images = tiny_tables(num_items=12, image_every=2)  # even items have images
    col = tiny_collator(tokens, images, mlm_probability=0.0)
    examples = [SequenceExample([1, 2, 3], None, 0), SequenceExample([4, 5], None, 1),
                SequenceExample([2, 7], None, 2)]
    with torch.no_grad():
        before = model(col(examples).history).pooled
        images.features[2] += 1.0  # item 2 has an image: sequences 0 and 2 contain it
        after = model(col(examples).history).pooled
        changed = [not torch.allclose(after[i], before[i], atol=1e-6) for i in range(3)]
        assert changed == [True, False, True]
        # Item 5 has no image: its feature row is ignored, the void vector is used.
        images.features[5] += 1.0
        assert torch.equal(model(col(examples).history).pooled, after)
        model.embeddings.void_image.add_(torch.randn(32))  # (a constant shift would vanish in LayerNorm)
        void_changed = model(col(examples).history).pooled
        changed = [not torch.allclose(void_changed[i], after[i], atol=1e-6) for i in range(3)]
        assert changed == [True, True, True]  # items 1, 3, 5, 7 have no image


def test_image_token_embedding_is_the_mlp_of_the_feature(tmp_path):
    _, model = _model(tmp_path, layers=2)
    feats = torch.randn(3, 8)
    present = torch.tensor([True, False, True])
    emb = model.embeddings.image_embeddings(feats, present)
    mlp = model.embeddings.image_mlp
    assert isinstance(mlp[1], torch.nn.GELU) and mlp[0].out_features == 16 and mlp[2].in_features == 16
    assert torch.allclose(emb[0], mlp(feats[0]))
    assert torch.equal(emb[1], model.embeddings.void_image)



def test_mean_routing_averages_top_adapters_and_ignores_domains(tmp_path):
    """Zero-shot routing: the top half averages every adapter, whatever the sequence's domain."""
    _, model = _model(tmp_path)
    model.set_routing("mean")
    with torch.no_grad():
        model.encoder.layer[-1].adapter.up_weight[3].normal_(std=0.5)  # domain 3 is in no sequence
    perturbed = _hidden(model, [0, 1, 2])
    assert _changed(perturbed, _hidden(model, [2, 2, 0])) == [False] * 3  # domains do not matter
    model.set_routing("domain")
    assert _changed(_hidden(model, [0, 1, 2]), perturbed) == [True, True, True]  # only mean mixes in 3
    with pytest.raises(ValueError, match="top routing"):
        model.set_routing("nearest")


def test_collator_without_image_table_uses_the_void_image(tmp_path):
    """No image table at all is the same as a table where no item has an image."""
    from reolm.data.tables import ImageFeatureTable

    model = tiny_reolm(tmp_path)
    tokens, _ = tiny_tables()
    cfg = tiny_model_config()
    examples = [SequenceExample([1, 2, 3], None, 0), SequenceExample([4, 5], None, 1)]
    no_table = tiny_collator(tokens, None, cfg, mlm_probability=0.0)(examples).history
    assert no_table.image_features.shape[1] == cfg.image_feature_dim
    empty = ImageFeatureTable.empty(len(tokens), cfg.image_feature_dim)
    all_void = tiny_collator(tokens, empty, cfg, mlm_probability=0.0)(examples).history
    with torch.no_grad():
        assert torch.equal(model(no_table).pooled, model(all_void).pooled)
