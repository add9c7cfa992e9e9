"""The encoder loaded from HF checkpoints reproduces HF's BertModel/RobertaModel exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from reolm.data.collate import pack_token_sequences, split_sequences
from reolm.model import CheckpointError, ReoLM
from tiny_models import save_tiny_checkpoint, tiny_model_config

SEQS = [[2, 10, 11, 12, 13], [2, 20, 21, 22, 23, 24, 25, 26, 27, 28], [2, 30, 31]]


def _hf_padded(hf, seqs, pad_id):
    """HF last_hidden_state of a right-padded batch, as the packed stream of real tokens."""
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), pad_id)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    return torch.cat([out[i, : len(s)] for i, s in enumerate(seqs)])


def _ours(model, seqs, layout):
    pad = model.backbone_config.pad_token_id
    batch = pack_token_sequences(seqs, layout=layout, pad_token_id=pad, pad_type_id=model.config.pad_type_id)
    with torch.no_grad():
        return torch.cat(split_sequences(model(batch).hidden, batch))


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_matches_hf_last_hidden_state(tmp_path, family, layout, backend):
    hf = save_tiny_checkpoint(tmp_path, family)
    model = ReoLM.from_backbone(tmp_path, tiny_model_config(attention=backend)).eval()
    ref = _hf_padded(hf, SEQS, hf.config.pad_token_id)
    assert torch.allclose(_ours(model, SEQS, layout), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_masked_lm_checkpoint_loads_head_from_last_bottom_layer(tmp_path, family):
    hf = save_tiny_checkpoint(tmp_path, family, masked_lm=True, layers=4)
    model = ReoLM.from_backbone(tmp_path, tiny_model_config()).eval()
    ids = torch.tensor([SEQS[1]])
    with torch.no_grad():
        hidden = hf(input_ids=ids, output_hidden_states=True).hidden_states
        head = hf.cls if family == "bert" else hf.lm_head
        ref = head(hidden[2])[0]  # hidden_states[2] = output of layer 1 = last bottom layer of 4
        out = model(pack_token_sequences([SEQS[1]]))
        logits = model.mlm_logits(out.mlm_hidden, torch.arange(len(SEQS[1])))
    assert torch.allclose(logits, ref, atol=1e-5, rtol=0)


def test_plain_backbone_gets_fresh_head_and_pytorch_bin_loads(tmp_path):
    hf = save_tiny_checkpoint(tmp_path, "bert")
    state = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = ReoLM.from_backbone(tmp_path, tiny_model_config()).eval()
    assert torch.equal(model.lm_head.bias, torch.zeros_like(model.lm_head.bias))
    assert torch.allclose(_ours(model, SEQS, "packed"), _hf_padded(hf, SEQS, 0), atol=1e-5, rtol=0)


def _rewrite(tmp_path, edit):
    state = load_file(str(tmp_path / "model.safetensors"))
    edit(state)
    save_file(state, str(tmp_path / "model.safetensors"))


def test_strict_key_check_rejects_extra_key(tmp_path):
    save_tiny_checkpoint(tmp_path, "bert")
    _rewrite(tmp_path, lambda s: s.__setitem__("encoder.layer.0.attention.self.extra", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected keys: encoder\.layer\.0\.attention\.self\.extra"):
        ReoLM.from_backbone(tmp_path, tiny_model_config())


def test_strict_key_check_rejects_missing_key(tmp_path):
    save_tiny_checkpoint(tmp_path, "roberta")
    _rewrite(tmp_path, lambda s: s.pop("encoder.layer.1.output.dense.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys: encoder\.layer\.1\.output\.dense\.weight"):
        ReoLM.from_backbone(tmp_path, tiny_model_config())


def test_wrong_shape_and_non_bert_config_are_clear_errors(tmp_path):
    save_tiny_checkpoint(tmp_path, "bert")
    _rewrite(tmp_path, lambda s: s.__setitem__("encoder.layer.0.intermediate.dense.bias", torch.zeros(5)))
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.0\.intermediate\.dense\.bias has shape"):
        ReoLM.from_backbone(tmp_path, tiny_model_config())
    cfg = (tmp_path / "config.json").read_text().replace('"model_type": "bert"', '"model_type": "gpt2"')
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(CheckpointError, match="gpt2"):
        ReoLM.from_backbone(tmp_path, tiny_model_config())


def test_untied_decoder_in_checkpoint_is_reported(tmp_path, caplog):
    save_tiny_checkpoint(tmp_path, "bert", masked_lm=True)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["cls.predictions.decoder.weight"] = torch.randn_like(state["bert.embeddings.word_embeddings.weight"])
    save_file(state, str(tmp_path / "model.safetensors"))
    with caplog.at_level("WARNING", logger="reolm.model.encoder"):
        model = ReoLM.from_backbone(tmp_path, tiny_model_config())
    assert "decoder weight differs" in caplog.text
    assert model.lm_head.decoder.weight is model.embeddings.word_embeddings.weight
