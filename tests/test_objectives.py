"""The shared scores and losses (reolm.model.objectives) and the one strict key check (hf_checkpoint)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reolm.eval.ranking import rank_targets
from reolm.model.hf_checkpoint import (CheckpointError, backbone_keys, key_mismatch, load_complete_state,
                                       normalise_hf_keys)
from reolm.model.objectives import (info_nce, masked_lm_loss, paired_scores, prepare_vectors, product_scores,
                                    similarity_scores)
from tiny_models import save_tiny_checkpoint, tiny_model_config


def _vectors(rows: int, dim: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------- scores

def test_cosine_and_dot_scores_divide_by_the_temperature():
    q, k = _vectors(3) * 5, _vectors(4, seed=1) * 0.1  # lengths that cosine must ignore
    cos = F.cosine_similarity(q[:, None], k[None], dim=-1)
    assert torch.allclose(similarity_scores(q, k, "cosine", 0.05), cos / 0.05, atol=1e-4)
    assert torch.allclose(similarity_scores(q, k, "dot", 2.0), q @ k.T / 2.0)
    assert torch.allclose(paired_scores(q, k[:3], "cosine", 0.05), cos.diagonal() / 0.05, atol=1e-4)
    with pytest.raises(ValueError, match="unknown similarity 'l2'"):
        similarity_scores(q, k, "l2")


def test_scores_are_never_computed_in_half_precision():
    q, k = _vectors(3), _vectors(4, seed=1)
    half = similarity_scores(q.half(), k.bfloat16(), "cosine", 0.05)
    assert half.dtype == torch.float32
    assert torch.equal(half, similarity_scores(q.half().float(), k.bfloat16().float(), "cosine", 0.05))
    assert similarity_scores(q.double(), k, "dot").dtype == torch.float64


def test_product_scores_in_a_buffer_equal_the_plain_product():
    q, k = (prepare_vectors(v, "cosine") for v in (_vectors(3), _vectors(5, seed=1)))
    buffer = torch.empty(3, 5)
    out = product_scores(q, k, 0.05, out=buffer)
    assert out.data_ptr() == buffer.data_ptr()
    assert torch.equal(out, product_scores(q, k, 0.05))


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_ranking_counts_the_items_scoring_above_the_target(similarity):
    users, items = _vectors(6), _vectors(40, seed=1)
    targets = torch.arange(6) * 5
    scores = similarity_scores(users, items, similarity, 0.05)
    own = scores.gather(1, targets[:, None])
    higher = (scores > own).sum(1)
    opt, pess = rank_targets(users, items, targets, similarity=similarity, temperature=0.05, item_chunk=7)
    assert torch.equal(opt, higher) and torch.equal(pess, higher)  # random vectors: no ties


# ----------------------------------------------------------------------------- InfoNCE

def test_info_nce_is_cross_entropy_over_the_scores_with_labels():
    q, k = _vectors(4), _vectors(9, seed=1)
    labels = torch.tensor([3, 0, 8, 5])
    result = info_nce(q, k, 0.05, labels=labels)
    logits = similarity_scores(q, k, "cosine", 0.05)
    assert torch.equal(result.loss, F.cross_entropy(logits, labels))
    assert result.correct.item() == int((logits.argmax(1) == labels).sum())
    # Default labels: query i's positive is key i.
    diagonal = F.cross_entropy(similarity_scores(q, k[:4], "cosine", 0.05), torch.arange(4))
    assert torch.equal(info_nce(q, k[:4], 0.05).loss, diagonal)


def test_info_nce_masks_other_keys_of_the_positive_item():
    q, k = _vectors(3), _vectors(5, seed=1)
    labels = torch.tensor([1, 2, 4])
    key_ids = torch.tensor([7, 7, 8, 9, 9])  # keys 0/1 and 3/4 hold the same item
    masked = info_nce(q, k, 0.05, labels=labels, key_ids=key_ids)
    logits = similarity_scores(q, k, "cosine", 0.05)
    logits[0, 0] = logits[2, 3] = float("-inf")  # the positive's duplicates, never the positive itself
    assert torch.allclose(masked.loss, F.cross_entropy(logits, labels))


# ----------------------------------------------------------------------------- MLM

def test_mlm_loss_on_one_process_is_the_mean_over_masked_tokens_exactly():
    logits = _vectors(12, dim=30).requires_grad_()
    labels = torch.randint(0, 30, (12,), generator=torch.Generator().manual_seed(2))
    labels[::3] = -100
    result = masked_lm_loss(logits, labels)
    reference = F.cross_entropy(logits, labels)
    assert torch.equal(result.loss, reference)  # bit-identical to the mean reduction ReoLM.mlm_loss had
    assert torch.equal(torch.autograd.grad(result.loss, logits)[0], torch.autograd.grad(reference, logits)[0])
    assert result.tokens.item() == 8
    valid = labels != -100
    assert result.correct.item() == int((logits.argmax(1) == labels)[valid].sum())


# ----------------------------------------------------------------------------- key checks

def test_key_mismatch_names_missing_unexpected_and_reshaped_keys():
    expected = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}
    assert key_mismatch({"a": torch.ones(2), "b": torch.ones(3), "c": torch.ones(1)}, expected) == ""
    problem = key_mismatch({"a": torch.ones(2), "b": torch.ones(4), "z": torch.ones(1)}, expected)
    assert problem == "missing keys: c; unexpected keys: z; wrong shapes: b (4,) (model (3,))"
    assert key_mismatch({"a": torch.ones(2), "head": torch.ones(1)}, {"a"}, optional={"head"}) == ""


def test_state_dict_keeps_hf_names_and_exports_check_every_key(tmp_path):
    from reolm.model import ReoLM
    hf = save_tiny_checkpoint(tmp_path, "bert")
    model = ReoLM.from_backbone(tmp_path, tiny_model_config())
    assert backbone_keys(model) == set(normalise_hf_keys(hf.state_dict()))
    assert "encoder.layer.1.attention.self.query.weight" in model.state_dict()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.decoder.weight"}
    load_complete_state(model, state, "here")
    state.pop("lm_head.bias")
    with pytest.raises(CheckpointError, match=r"^here \(missing keys: lm_head\.bias\)$"):
        load_complete_state(model, state, "here")

    class Refused(ValueError):
        pass

    with pytest.raises(Refused):
        load_complete_state(model, state, "here", error=Refused)
