"""GPU benchmark: training throughput (real tokens/s) and MFU of Reo-LM per attention backend,
against a padded Hugging Face ``RobertaModel`` (eager attention) on the same sequences.

Configs: the paper's L12 H384 (MiniLMv2-sized) and base L12 H768, RoBERTa vocabulary, bf16
weights, random init (speed does not depend on the values).  One step = encode the histories and
the target items, InfoNCE over the batch, + 0.1 x MLM for Reo-LM (the HF baseline does InfoNCE
only, so it is favoured), backward.  tokens/s counts real tokens of histories and targets (never
padding), MFU = model FLOPs of those tokens per second / the GPU's peak dense bf16 FLOP/s.

    python bench/throughput.py                       # on a GPU: writes bench/results/throughput_gpu.json
    python bench/throughput.py --out DIR/throughput_gpu.json   # or there

The JSON is rewritten after every measured row ("complete": false until the end), so a run
stopped by a time limit keeps the rows it measured.
    python bench/throughput.py --device cpu --smoke  # correctness smoke check; writes nothing

"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from common import (PartialResult, machine, save_random_roberta, synthetic_examples, synthetic_tables,
                    training_loss)
from common import collator as make_collator
from reolm.data.collate import TrainingBatch, move_batch
from reolm.data.tables import load_tokenizer
from reolm.model import ModelConfig, ReoLM
from reolm.model.attention import flash_available, varlen_available

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
CONFIGS = {"L12-H384": (12, 384, 12), "L12-H768": (12, 768, 12)}
SMOKE_CONFIGS = {"L2-H64": (2, 64, 4)}


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def step_flops(model: ReoLM, batch: TrainingBatch, reolm_parts: bool = True) -> float:
    """Training FLOPs of one step on the real tokens; the HF baseline has no adapters and no MLM, and
    runs its last layer on every token (ours, as pre-training does, on the [CLS] rows)."""
    flops = (model.training_flops(batch.history, include_mlm=reolm_parts, pooled_only=reolm_parts)
             + model.training_flops(batch.target, include_mlm=False, pooled_only=reolm_parts))
    if not reolm_parts:
        bb, cfg = model.backbone_config, model.config
        adapters = 2 * bb.hidden_size * cfg.num_adapters * cfg.adapter_rank
        flops -= 3 * bb.num_hidden_layers * 2 * adapters * real_tokens(batch)
    return flops


def real_tokens(batch: TrainingBatch) -> int:
    return batch.num_real_tokens  # history + target


def padded_hf_inputs(batch: TrainingBatch, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """The same token sequences (image slots as pad-id tokens) as right-padded [B, L] HF inputs."""
    from reolm.data.collate import split_sequences
    out = []
    for part in (batch.history, batch.target):
        seqs = split_sequences(part.input_ids, part)
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), length, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def hf_loss(hf: Any, inputs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    seq = hf(**inputs[0]).last_hidden_state[:, 0]
    item = hf(**inputs[1]).last_hidden_state[:, 0]
    logits = F.normalize(seq.float(), dim=-1) @ F.normalize(item.float(), dim=-1).T / 0.05
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def time_steps(step, device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds of one step (each step synchronised)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def backends_for(device: torch.device) -> list[str]:
    names = ["eager", "sdpa"]
    if device.type == "cuda" and varlen_available():
        names.append("varlen")
    if device.type == "cuda" and flash_available():
        names.append("flash")
    return names


def run_config(name: str, shape: tuple[int, int, int], args: argparse.Namespace, device: torch.device,
               dtype: torch.dtype, peak: float | None, record: Callable[[dict[str, Any]], None]) -> None:
    """Time the padded HF baseline, then every backend, on one model shape; ``record`` gets each row
    as soon as it is measured."""
    layers, hidden, heads = shape
    vocab = 1000 if args.smoke else 50265
    cfg = ModelConfig(max_tokens=args.max_tokens, image_feature_dim=args.image_dim, hidden_dropout=0.0,
                      attention_dropout=0.0, adapter_rank=16 if args.smoke else 128)
    with tempfile.TemporaryDirectory() as tmp:
        save_random_roberta(Path(tmp), layers, hidden, heads, vocab=vocab, max_positions=args.max_tokens + 2)
        model = ReoLM.from_backbone(tmp, cfg).to(device=device, dtype=dtype).train()
        tokenizer = load_tokenizer(tmp)  # read before the folder goes
        from transformers import RobertaModel
        hf = RobertaModel.from_pretrained(tmp, attn_implementation="eager", add_pooling_layer=False)
        hf = hf.to(device=device, dtype=dtype).train()
    for module in hf.modules():  # same dropout setting as ours
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    tokens, images = synthetic_tables(20000 if not args.smoke else 500, vocab, args.image_dim)
    examples = synthetic_examples(args.batch_size, len(tokens), cfg.num_adapters)
    batch = make_collator(tokens, images, tokenizer, model.config, "packed")(examples)
    hf_inputs = [move_batch(x, device) for x in padded_hf_inputs(batch, model.backbone_config.pad_token_id)]
    batch = batch.to(device)
    n_tokens, flops = real_tokens(batch), step_flops(model, batch)

    def hf_step() -> None:
        hf.zero_grad(set_to_none=True)
        hf_loss(hf, hf_inputs).backward()

    hf_seconds = time_steps(hf_step, device, args.warmup, args.steps)
    hf_flops = step_flops(model, batch, reolm_parts=False)
    record({"config": name, "backend": "hf-roberta-eager-padded", "tokens_per_s": round(n_tokens / hf_seconds, 1),
            "mfu": round(hf_flops / hf_seconds / peak, 4) if peak else None, "speedup_vs_padded_hf": 1.0})
    hf = None  # free the reference model before timing ours (hf_step, which uses it, has run)
    reference = None
    for backend in backends_for(device):
        model.set_attention(backend)

        def step() -> None:
            model.zero_grad(set_to_none=True)
            training_loss(model, batch).backward()

        if args.smoke:  # correctness: every backend gives the eager loss
            with torch.no_grad():
                loss = float(training_loss(model, batch))
            assert loss == loss and loss < 100, f"{backend}: loss {loss}"
            reference = loss if reference is None else reference
            assert abs(loss - reference) < 1e-3 * max(1.0, abs(reference)), (backend, loss, reference)
        seconds = time_steps(step, device, args.warmup, args.steps)
        record({"config": name, "backend": backend, "tokens_per_s": round(n_tokens / seconds, 1),
                "mfu": round(flops / seconds / peak, 4) if peak else None,
                "speedup_vs_padded_hf": round(hf_seconds / seconds, 3)})
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny config, few steps, loss checks; writes nothing")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per batch")
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--image-dim", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's peak bf16 TFLOP/s")
    parser.add_argument("--out", default="throughput_gpu.json",
                        help="result JSON: a file name under bench/results/, or a path")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --smoke for a correctness check", file=sys.stderr)
        return 2
    if args.smoke:
        args.batch_size, args.max_tokens, args.image_dim = min(args.batch_size, 6), min(args.max_tokens, 256), 16
        args.warmup, args.steps = 1, 2
        configs = SMOKE_CONFIGS
    else:
        configs = {k: CONFIGS[k] for k in args.configs.split(",")}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = peak_flops(device, args.peak_tflops)
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    partial = None if args.smoke else PartialResult(args.out, device=machine(args.device), dtype=str(dtype),
                                                    batch_size=args.batch_size, max_tokens=args.max_tokens, rows=rows)

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        if partial is not None:
            partial.update(rows=rows)

    for name, shape in configs.items():
        run_config(name, shape, args, device, dtype, peak, record)
    print(f"{'config':10} {'backend':26} {'tokens/s':>12} {'MFU':>7} {'vs HF':>7}")
    for r in rows:
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        print(f"{r['config']:10} {r['backend']:26} {r['tokens_per_s']:12.1f} {mfu:>7} {r['speedup_vs_padded_hf']:7.2f}")
    if args.smoke:
        print("smoke check passed (figures above are CPU, not written)")
        return 0
    print("wrote", partial.finish())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
