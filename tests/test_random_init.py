from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reolm.random_init import init_backbone, init_vision


def _tiny_wordpiece_tokenizer(path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(["red shoes brand acme", "blue guitar strings", "title category brand void"] * 5,
                            trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(path)
    return fast


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_backbone_matches_tokenizer_and_loads_with_auto(tmp_path, arch):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tok = _tiny_wordpiece_tokenizer(tmp_path / "tok")
    out = init_backbone(tmp_path / "tok", tmp_path / "bb", size="tiny", arch=arch, max_position_embeddings=64)
    model = AutoModelForMaskedLM.from_pretrained(out)
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tok)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert len(AutoTokenizer.from_pretrained(out)) == len(tok)
    ids = torch.tensor([tok("red shoes")["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))


def test_same_seed_same_weights(tmp_path):
    _tiny_wordpiece_tokenizer(tmp_path / "tok")
    from safetensors.torch import load_file
    a = load_file(init_backbone(tmp_path / "tok", tmp_path / "a", size="tiny") / "model.safetensors")
    b = load_file(init_backbone(tmp_path / "tok", tmp_path / "b", size="tiny") / "model.safetensors")
    other = load_file(init_backbone(tmp_path / "tok", tmp_path / "c", size="tiny", seed=1) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # ...and every weight matrix (embeddings, attention, FFN, head) is a random draw of that seed, not
    # a constant: BERT's init has std 0.02 (LayerNorm weights are ones and biases zeros by design).
    matrices = [k for k in a if a[k].dim() == 2]
    assert len(matrices) >= 2 * 6 + 3, matrices  # 6 per layer (q, k, v, output, FFN in/out), 2 layers
    for name in matrices:
        assert a[name].std() > 0.01, name
        assert not torch.equal(a[name], other[name]), name


def test_vision_checkpoint_encodes_images(tmp_path):
    from transformers import AutoImageProcessor, AutoModel

    out = init_vision(tmp_path / "vit", image_size=32, hidden=48)
    model, proc = AutoModel.from_pretrained(out), AutoImageProcessor.from_pretrained(out)
    imgs = [Image.fromarray(np.full((40, 50, 3), c, dtype=np.uint8)) for c in (0, 255)]
    pooled = model(**proc(images=imgs, return_tensors="pt")).pooler_output
    assert pooled.shape == (2, 48)
    assert not torch.allclose(pooled[0], pooled[1])  # different images, different features
