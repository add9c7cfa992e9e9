"""CPU precision (auto | fp32 | bf16), the CPU training attention backend, cheap dropout masks and
the allocator setting: resolution, recording, parity with fp32 and with the reference math."""

from __future__ import annotations

import importlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from tiny_models import tiny_collator, tiny_model_config, tiny_reolm, tiny_tables, tiny_tokenizer

from reolm.config import ConfigError, apply_overrides
from reolm.data.collate import SequenceExample
from reolm.finetune.config import FinetuneConfig
from reolm.finetune.reolm_recommender import ReoLMRecommender
from reolm.model.dropout import dropout, keep_mask
from reolm.precision import cpu_bf16_flags, resolve_precision

A = importlib.import_module("reolm.model.attention")  # the module: reolm.model exports a function of that name

X86_AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


# ----------------------------------------------------------------------------- resolution

def test_cpu_flags_name_native_bf16_only():
    assert cpu_bf16_flags(X86_AMX) == ["amx_bf16", "avx512_bf16"]
    assert cpu_bf16_flags(ARM_BF16) == ["bf16"]
    assert cpu_bf16_flags(X86_AVX2) == [] and cpu_bf16_flags("") == []


def test_auto_is_bf16_only_where_the_cpu_multiplies_bf16_natively():
    assert resolve_precision("auto", "cpu", fast_cpu_bf16=True) == "bf16"
    assert resolve_precision("auto", "cpu", fast_cpu_bf16=False) == "fp32"  # e.g. an AVX2-only CPU
    assert resolve_precision("auto", "cuda", fast_cpu_bf16=False) == "bf16"  # CUDA: bf16 autocast, as before
    assert resolve_precision("fp32", "cuda") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    # a narrow model stays fp32 on CPU (too small for bf16 to pay for its casts), not on CUDA
    assert resolve_precision("auto", "cpu", fast_cpu_bf16=True, hidden_size=128) == "fp32"
    assert resolve_precision("auto", "cpu", fast_cpu_bf16=True, hidden_size=384) == "bf16"
    assert resolve_precision("auto", "cuda", hidden_size=128) == "bf16"
    assert resolve_precision("bf16", "cpu", fast_cpu_bf16=False, hidden_size=32) == "bf16"  # asked: given
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        resolve_precision("fp16", "cpu")


def test_precision_is_a_validated_config_key():
    assert apply_overrides(FinetuneConfig(), ["train.precision=bf16"]).train.precision == "bf16"
    with pytest.raises(ConfigError, match="precision"):
        apply_overrides(FinetuneConfig(), ["train.precision=fp16"])


# ----------------------------------------------------------------------------- recommender

def _rec(tmp_path, requested: str, pooling: str = "cls") -> ReoLMRecommender:
    torch.manual_seed(0)  # the same weights for every call (fresh parameters draw from the global RNG)
    model = tiny_reolm(tmp_path, attention="auto", top_routing="gate", pooling=pooling)
    with torch.no_grad():  # non-zero adapters: every path of the layer matters
        for layer in model.encoder.layer:
            layer.adapter.up_weight.normal_(std=0.05)
    tokens, images = tiny_tables(num_items=60, seed=1)
    rec = ReoLMRecommender(model, tiny_tokenizer(), progress=False).set_precision(requested)
    return rec.bind_tables(tokens, images)


def test_bf16_and_fp32_rank_the_same_top10_for_most_users(tmp_path):
    """Mean pooling: a random tiny model's [CLS] vectors are all alike (cosine 0.99999 between
    items), so its ranking is a tie that any rounding reorders; mean-pooled vectors spread (score sd
    ~0.5).  The tolerance: bf16's 8-bit mantissa still reorders near-ties, so at least 8 of every
    user's top 10 and 9.5 on average must agree, and the vectors stay within cosine 0.999 of fp32."""
    fp32 = _rec(tmp_path / "a", "fp32", pooling="mean")
    bf16 = _rec(tmp_path / "b", "bf16", pooling="mean")
    assert fp32.precision == "fp32" and bf16.precision == "bf16"
    histories = [list(np.random.default_rng(u).integers(0, 60, 5)) for u in range(40)]
    ref_items, ref_users = fp32.encode_all_items(), fp32.user_vectors(histories)
    items, users = bf16.encode_all_items(), bf16.user_vectors(histories)
    assert items.dtype == torch.float32  # vectors and scores stay fp32
    cos = torch.nn.functional.cosine_similarity
    assert cos(items, ref_items).min() > 0.999 and cos(users, ref_users).min() > 0.999
    top_ref = fp32.model.score(ref_users, ref_items).topk(10).indices
    top = bf16.model.score(users, items).topk(10).indices
    overlap = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top, top_ref)]
    assert min(overlap) >= 8 and np.mean(overlap) >= 9.5, overlap
    # The training weights stay fp32: bf16 inference runs on a copy.
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())


def test_the_bf16_inference_copy_follows_the_weights(tmp_path):
    rec = _rec(tmp_path, "bf16")
    before = rec.encode_all_items()
    copy = rec.inference_encoder()
    assert copy is not rec.model and rec.inference_encoder() is copy  # reused while weights are unchanged
    with torch.no_grad():
        rec.model.encoder.layer[0].intermediate.dense.weight.mul_(2.0)
    after = rec.encode_all_items()
    assert rec.inference_encoder() is not copy and not torch.allclose(before, after, atol=1e-3)


def test_autocast_follows_the_resolved_precision(tmp_path):
    rec = _rec(tmp_path, "bf16")
    with rec.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with rec.set_precision("fp32").autocast():
        assert not torch.is_autocast_enabled("cpu")
    rec.model.double()  # a model cast on purpose computes in its own dtype
    assert rec.set_precision("bf16").precision == "fp64" and rec.inference_encoder() is rec.model


# ----------------------------------------------------------------------------- math backend

def _qkv(lengths, heads=2, dim=8, seed=0, dtype=torch.float32):
    from reolm.data.collate import attention_groups, grid_sources
    lengths = np.array(sorted(lengths, reverse=True))
    grid, groups = attention_groups(lengths, 0.5)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    layout = A.AttentionLayout(cu, int(lengths[0]), torch.from_numpy(grid), torch.from_numpy(lengths), groups,
                               grid_source=torch.from_numpy(grid_sources(grid, groups)))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(int(lengths.sum()), heads, dim, generator=g).to(dtype) for _ in range(3))
    return q, k, v, layout


@pytest.mark.parametrize("lengths", [[7, 5, 5, 2, 1], [200, 150, 40, 9]])
def test_math_backend_matches_the_reference_in_fp32(lengths):
    """Groups with padding (gathered), without, and one past MATH_MAX_LENGTH (SDPA's kernel)."""
    q, k, v, layout = _qkv(lengths)
    for t in (q, k, v):
        t.requires_grad_()
    ref = A.eager_attention(q, k, v, layout)
    grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    out = A.math_attention(q, k, v, layout, training=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert torch.allclose(out, ref, atol=1e-5)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-4)
    cls_ref = A.eager_attention(q[layout.cls_rows], k, v, layout, cls_only=True)
    assert torch.allclose(A.math_attention(q[layout.cls_rows], k, v, layout, cls_only=True), cls_ref, atol=1e-5)


def test_math_backend_applies_attention_dropout_in_training_only():
    q, k, v, layout = _qkv([9, 6, 6, 3])
    ref = A.math_attention(q, k, v, layout)
    assert torch.equal(A.math_attention(q, k, v, layout, dropout_p=0.5, training=False), ref)
    torch.manual_seed(0)
    dropped = A.math_attention(q, k, v, layout, dropout_p=0.5, training=True)
    assert not torch.allclose(dropped, ref, atol=1e-3)
    torch.manual_seed(0)
    assert torch.equal(A.math_attention(q, k, v, layout, dropout_p=0.5, training=True), dropped)


def test_derived_grid_source_equals_the_collators():
    q, k, v, layout = _qkv([7, 5, 5, 2, 1])
    derived = A.AttentionLayout(layout.cu_seqlens, layout.max_seqlen, layout.grid_index, layout.seq_lengths,
                                layout.groups)
    assert torch.equal(derived.grid_source, layout.grid_source)
    assert torch.equal(A.sdpa_attention(q, k, v, derived), A.sdpa_attention(q, k, v, layout))


def test_model_trains_on_cpu_with_math_in_bf16_close_to_fp32(tmp_path):
    """One forward + backward of a model under bf16 autocast, through the math backend, against the
    same model in fp32 with the reference backend."""
    model = tiny_reolm(tmp_path, attention="auto").train()
    tokens, images = tiny_tables(num_items=30)
    batch = tiny_collator(tokens, images, tiny_model_config(), seed=0)(
        [SequenceExample(list(range(s, s + n)), None, d) for s, n, d in [(0, 1, 0), (3, 6, 1), (10, 3, 2)]]).history
    assert model.attention_backend(torch.device("cpu"), torch.bfloat16) == "math"

    def pooled_grad(autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            pooled = model(batch).pooled.float()
        pooled.square().sum().backward()
        return pooled.detach(), model.encoder.layer[0].attention.self.query.weight.grad.clone()

    ref, ref_grad = pooled_grad(False)
    out, grad = pooled_grad(True)
    assert torch.allclose(out, ref, atol=0.05 * ref.abs().max())
    assert torch.nn.functional.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0) > 0.98


# ----------------------------------------------------------------------------- dropout

def test_keep_mask_rate_and_reproducibility():
    torch.manual_seed(3)
    mask = keep_mask((1000, 1000), 0.1)
    assert mask.dtype == torch.bool and abs(mask.float().mean().item() - 0.9) < 0.002  # 1M draws: sd 0.0003
    assert abs(mask[:, :500].float().mean() - mask[:, 500:].float().mean()) < 0.003  # every lane is random
    torch.manual_seed(3)
    assert torch.equal(keep_mask((1000, 1000), 0.1), mask)


def test_dropout_scales_kept_elements_and_routes_gradients_through_them():
    x = torch.randn(300, 64, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x, 0.25, training=True)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.75)
    assert dropout(x, 0.25, training=False) is x and dropout(x, 0.0, training=True) is x


# ----------------------------------------------------------------------------- allocator

def test_allocator_setting_takes_effect_and_can_be_turned_off():
    code = "from reolm.runtime import keep_freed_memory; print(keep_freed_memory())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "REOLM_KEEP_FREED_MEMORY": "0"})
    assert on.stdout.strip() == ("True" if sys.platform.startswith("linux") else "False")
    assert off.stdout.strip() == "False"


FRAGMENTED_HEAP = """
import json, torch
from reolm.runtime import FreedMemoryBound, resident_bytes, setup_process
setup_process()
bound = FreedMemoryBound(growth=1.0, slack_bytes=64 << 20)
# 3,000 tensors of 64-256 KB (~480 MB) of varied sizes, as activations of varied shapes are; keeping
# every 50th pins the heap's top, so nothing is trimmed by itself.
tensors = [torch.ones(16_000 + (i * 7919) % 48_000) for i in range(3_000)]
kept = tensors[::50]
del tensors
freed = resident_bytes()
first, after = bound.check(), resident_bytes()
again = bound.check()
print(json.dumps({"active": bound.active, "freed": freed, "first": first, "after": after, "again": again,
                  "trims": bound.trims, "kept_sum": float(sum(t.sum() for t in kept))}))
"""


def _fragmented_heap(env_extra: dict[str, str]) -> dict:
    env = {**__import__("os").environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, check=True, env=env)
    return __import__("json").loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator setting is glibc-only")
def test_kept_freed_memory_is_returned_once_resident_memory_passes_the_bound():
    run = _fragmented_heap({})
    assert run["active"] and run["first"] and run["trims"] == 1
    # ~470 MB of the ~480 MB were freed but kept by malloc: the trim gives most of it back.
    assert run["freed"] - run["after"] > 300 * 2**20, run
    assert run["again"] is False  # under the new bound: nothing to do
    assert run["kept_sum"] > 0


def test_bound_does_nothing_when_the_allocator_is_left_alone():
    run = _fragmented_heap({"REOLM_KEEP_FREED_MEMORY": "0"})
    assert not run["active"] and not run["first"] and run["trims"] == 0
