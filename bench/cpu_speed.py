"""CPU benchmark: Reo-LM against plain Hugging Face, in fp32 and bf16, at the real shapes of
fine-tuning, evaluation and pre-training.

Workloads (each timed as the minimum over ``--repeats``, all configurations interleaved in one
run after one warm-up each):

* ``catalogue``: every item encoded without gradient ([CLS] item);
* ``histories``: ``--users`` evaluation histories (the last 9 items) encoded without gradient;
* ``stage1``: one fine-tuning step of stage 1, forward + backward: 16 histories of <= 10 items,
  their targets and 1,000 negatives, all encoded with gradient, InfoNCE over cosine / 0.05;
* ``stage2``: one stage-2 step: 16 histories against a frozen table of every item;
* ``pretrain``: one pre-training step on the model (no DeepSpeed): 16 histories with MLM and
  their targets, InfoNCE + 0.1 x MLM.

Configurations: ``hf-fp32`` (plain ``transformers`` model, default attention, batches padded to
their longest after sorting by length: what a user would write), ``hf-bf16`` (the same under
``torch.autocast("cpu", bfloat16)``), ``reolm-fp32`` and ``reolm-bf16`` (``precision``, see
``reolm/precision.py``).  HF runs the text tokens of each item (no image token) and has no MLM
head, so it skips ``pretrain``.  Model FLOPs/s of Reo-LM are given as a fraction of a bf16 matmul
measured in the same run.

    python bench/cpu_speed.py [--backbone HF_DIR] [--domain DIR] [--repeats 2] [--quick]

Without ``--backbone``, a random-weight model of all-MiniLM-L6-v2's shape (6 layers, 384 wide, 12
heads); without ``--domain``, 2,420 synthetic items of 20-100 tokens.  Writes
``bench/results/cpu_speed.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from common import PartialResult, machine, save_random_roberta, synthetic_tables
from reolm.data.collate import SequenceExample
from reolm.data.tables import load_tokenizer
from reolm.finetune.reolm_recommender import ReoLMRecommender
from reolm.finetune.reolm_trainer import MicroBatch, StepBatch, TrainCost, train_step
from reolm.model import ModelConfig, ReoLM
from reolm.model.objectives import info_nce
from reolm.precision import cpu_bf16_flags
from reolm.runtime import keep_freed_memory

CONFIGS = ("hf-fp32", "hf-bf16", "reolm-fp32", "reolm-bf16")
WORKLOADS = ("catalogue", "histories", "stage1", "stage2", "pretrain")
NEGATIVES, BATCH, HISTORY, EVAL_HISTORY, TEMPERATURE = 1000, 16, 10, 9, 0.05


# ----------------------------------------------------------------------------- inputs

class Inputs:
    """The items (token ids per item), users' histories and the sampled training steps."""

    def __init__(self, rec: ReoLMRecommender, histories: list[list[int]], users: int, seed: int = 0):
        tokens = rec.tokens
        self.item_ids = [np.asarray(tokens.ids[tokens.offsets[i]:tokens.offsets[i + 1]]) for i in range(len(tokens))]
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(histories), size=min(users, len(histories)), replace=False)
        self.eval_histories = [histories[i][-EVAL_HISTORY:] for i in pick]
        prefixes = [(h[max(0, t - HISTORY):t], h[t]) for h in histories for t in range(1, len(h))]
        chosen = rng.choice(len(prefixes), size=BATCH, replace=False)
        self.step = [prefixes[i] for i in chosen]
        targets = np.array([t for _, t in self.step])
        negatives = rng.choice(len(tokens), size=NEGATIVES, replace=False)
        self.pool = np.unique(np.concatenate([targets, negatives]))
        self.labels = torch.from_numpy(np.searchsorted(self.pool, targets))


def synthetic_histories(num_items: int, users: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, num_items, int(rng.integers(5, 16))).tolist() for _ in range(users)]


# ----------------------------------------------------------------------------- plain HF

class HFReference:
    """Plain ``transformers`` encoder with [CLS] pooling, padded batches sorted by length."""

    def __init__(self, folder: str, inputs: Inputs, cls_id: int, pad_id: int, bf16: bool):
        from transformers import AutoModel
        self.model = AutoModel.from_pretrained(folder, add_pooling_layer=False)
        self.inputs, self.cls_id, self.pad_id = inputs, cls_id, pad_id
        self.context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        self.max_len = self.model.config.max_position_embeddings - 2

    def _sequence(self, items: list[int]) -> np.ndarray:
        """[CLS] + the items' tokens, most recent first, cut to the position table."""
        parts = [np.array([self.cls_id])] + [self.inputs.item_ids[i] for i in reversed(items)]
        return np.concatenate(parts)[:self.max_len]

    def _encode(self, sequences: list[np.ndarray], chunk: int) -> tuple[torch.Tensor, int]:
        order = np.argsort([-len(s) for s in sequences], kind="stable")
        out, tokens = [], 0
        for start in range(0, len(order), chunk):
            part = [sequences[i] for i in order[start:start + chunk]]
            longest = max(len(s) for s in part)
            ids = torch.full((len(part), longest), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(part), longest), dtype=torch.long)
            for row, seq in enumerate(part):
                ids[row, :len(seq)], mask[row, :len(seq)] = torch.from_numpy(seq.astype(np.int64)), 1
            tokens += int(mask.sum())
            with self.context():
                out.append(self.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0].float())
        vectors = torch.cat(out)
        return vectors[torch.from_numpy(np.argsort(order))], tokens

    def catalogue(self) -> int:
        self.model.eval()
        with torch.no_grad():
            return self._encode([self._sequence([i]) for i in range(len(self.inputs.item_ids))], 512)[1]

    def histories(self) -> int:
        self.model.eval()
        with torch.no_grad():
            return self._encode([self._sequence(h) for h in self.inputs.eval_histories], 512)[1]

    def _step(self, candidates: Callable[[], tuple[torch.Tensor, int]]) -> int:
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        users, tokens = self._encode([self._sequence(h) for h, _ in self.inputs.step], BATCH)
        items, item_tokens = candidates()
        info_nce(users, items, TEMPERATURE, labels=self.inputs.labels).loss.backward()
        return tokens + item_tokens

    def stage1(self) -> int:
        return self._step(lambda: self._encode([self._sequence([int(i)]) for i in self.inputs.pool], 256))

    def stage2(self, table: torch.Tensor) -> int:
        targets = torch.tensor([t for _, t in self.inputs.step])
        labels, self.inputs.labels = self.inputs.labels, targets
        try:
            return self._step(lambda: (table, 0))
        finally:
            self.inputs.labels = labels


# ----------------------------------------------------------------------------- Reo-LM

class ReoLMRunner:
    """The same workloads through Reo-LM's own code paths (recommender, trainer step)."""

    def __init__(self, rec: ReoLMRecommender, inputs: Inputs, precision: str):
        self.rec, self.inputs, self.precision = rec, inputs, precision
        self.cost = TrainCost()

    def catalogue(self) -> int:
        self.rec.set_precision(self.precision)._encoded = None
        self.rec.encode_all_items()
        return int(self.rec.last_encoding["tokens"])

    def histories(self) -> int:
        batch = self.rec.set_precision(self.precision).eval_collate(
            [SequenceExample(h) for h in self.inputs.eval_histories]).history
        self.rec.user_vectors(self.inputs.eval_histories)
        self.cost.flops = self.rec.model.training_flops(batch, include_mlm=False, pooled_only=True) / 3
        return batch.num_real_tokens

    def _train(self, batch: StepBatch, mlm_weight: float) -> int:
        self.rec.set_precision(self.precision).train()
        self.rec.model.zero_grad(set_to_none=True)
        self.cost = TrainCost()
        train_step(self.rec, batch, mlm_weight, self.cost)
        return sum(m.history.num_real_tokens for m in batch.micro) + sum(p.num_real_tokens for p in batch.pools)

    def stage1(self) -> int:
        collate = self.rec.collator(mlm_probability=0.15, seed=0)
        histories = collate([SequenceExample(h) for h, _ in self.inputs.step]).history
        pool = collate.collate_items(self.inputs.pool.tolist())
        items = torch.from_numpy(self.inputs.pool.astype(np.int64))
        return self._train(StepBatch([MicroBatch(histories, self.inputs.labels, 0)], [pool], [items]), 0.1)

    def stage2(self) -> int:
        collate = self.rec.collator(mlm_probability=0.0, seed=0)
        histories = collate([SequenceExample(h) for h, _ in self.inputs.step]).history
        targets = torch.tensor([t for _, t in self.inputs.step])
        return self._train(StepBatch([MicroBatch(histories, targets)]), 0.0)

    def pretrain(self) -> int:
        """Histories with MLM and their targets: InfoNCE + 0.1 x MLM (what ``train/step.py`` computes)."""
        model = self.rec.set_precision(self.precision).train().model
        batch = self.rec.collator(mlm_probability=0.15, seed=0)(
            [SequenceExample(h, t) for h, t in self.inputs.step])
        model.zero_grad(set_to_none=True)
        with self.rec.autocast():
            out = model(batch.history, pooled_only=True)
            items = model.encode(batch.target)
            mlm = model.mlm_loss(out, batch.history)
        (info_nce(out.pooled, items, TEMPERATURE).loss + 0.1 * mlm).backward()
        self.cost = TrainCost(model.training_flops(batch.history, pooled_only=True)
                              + model.training_flops(batch.target, include_mlm=False, pooled_only=True))
        return batch.history.num_real_tokens + batch.target.num_real_tokens


# ----------------------------------------------------------------------------- timing

def matmul_rate(dtype: torch.dtype, seconds: float = 1.0) -> float:
    """FLOP/s of a [1024, 384] x [384, 1536] matmul (an FFN of a 384-wide model) on every torch thread."""
    a, b = torch.randn(1024, 384, dtype=dtype), torch.randn(384, 1536, dtype=dtype)
    a @ b
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 1024 * 384 * 1536 / best


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def profile_top(fn: Callable[[], Any], rows: int = 10) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1),
             "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in events]


def build(args: argparse.Namespace, tmp: Path) -> tuple[ReoLMRecommender, Inputs, str]:
    if args.backbone:
        folder = args.backbone
    else:
        folder = str(save_random_roberta(tmp / "minilm-shaped", layers=6, hidden=384, heads=12, vocab=30522,
                                         max_positions=514))
    cfg = ModelConfig(top_routing="gate", max_tokens=512)
    torch.manual_seed(0)
    model = ReoLM.from_backbone(folder, cfg)
    rec = ReoLMRecommender(model, load_tokenizer(folder), progress=False)
    if args.domain:
        from reolm.data.domain import read_domain
        domain = read_domain(args.domain)
        rec.bind(domain)
        histories = [seq for _, seq in sorted(domain.train.items()) if len(seq) >= 2]
    else:
        tokens, images = synthetic_tables(2420, model.backbone_config.vocab_size, cfg.image_feature_dim)
        rec.bind_tables(tokens, images)
        histories = synthetic_histories(len(tokens), 4905)
    return rec, Inputs(rec, histories, args.users), folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", help="HF BERT/RoBERTa checkpoint directory (default: random, MiniLM-L6-shaped)")
    parser.add_argument("--domain", help="processed domain folder (default: 2,420 synthetic items)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per configuration (after one warm-up)")
    parser.add_argument("--users", type=int, default=1024, help="evaluation histories encoded")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--quick", action="store_true", help="one repeat, 256 users, no profile")
    parser.add_argument("--out", default="cpu_speed.json", help="results file (a bare name goes under bench/results/)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.users = 1, 256
    allocator = keep_freed_memory()
    with tempfile.TemporaryDirectory() as tmp:
        rec, inputs, folder = build(args, Path(tmp))
        tok = rec.tokenizer
        runners: dict[str, Any] = {}
        for name in args.configs:
            if name.startswith("hf"):
                runners[name] = HFReference(folder, inputs, tok.cls_token_id, tok.pad_token_id, name == "hf-bf16")
            else:
                runners[name] = ReoLMRunner(rec, inputs, name.split("-")[1])
        table = torch.nn.functional.normalize(torch.randn(len(inputs.item_ids), rec.model.backbone_config.hidden_size),
                                              dim=1)
        rec.item_table = table
        calls = {
            "catalogue": lambda r: r.catalogue(),
            "histories": lambda r: r.histories(),
            "stage1": lambda r: r.stage1(),
            "stage2": lambda r: r.stage2(table) if isinstance(r, HFReference) else r.stage2(),
            "pretrain": lambda r: r.pretrain(),
        }
        rates = {"bf16": matmul_rate(torch.bfloat16), "fp32": matmul_rate(torch.float32)}
        results: dict[str, dict[str, Any]] = {w: {} for w in args.workloads}
        record = PartialResult(
            args.out, machine={**machine(), "cpu_bf16_flags": cpu_bf16_flags(),
                               "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                               "allocator_keeps_freed_memory": allocator},
            backbone=args.backbone or "random MiniLM-L6-shaped (6 x 384, 12 heads)",
            domain=args.domain or "2,420 synthetic items of 20-100 tokens", repeats=args.repeats,
            matmul_tflops_per_s={k: round(v / 1e12, 3) for k, v in rates.items()})
        for workload in args.workloads:
            names = [n for n in args.configs if not (workload == "pretrain" and n.startswith("hf"))]
            for name in names:  # warm-up (and the first allocation of everything)
                calls[workload](runners[name])
            best: dict[str, tuple[float, int, float]] = {}
            for _ in range(args.repeats):
                for name in names:
                    seconds, tokens = timed(lambda: calls[workload](runners[name]))
                    flops = runners[name].cost.flops if isinstance(runners[name], ReoLMRunner) else 0.0
                    if name not in best or seconds < best[name][0]:
                        best[name] = (seconds, tokens, flops)
            for name, (seconds, tokens, flops) in best.items():
                row = {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}
                if workload in ("catalogue",) and isinstance(runners[name], ReoLMRunner):
                    flops = rec.model.training_flops(rec.eval_collate.collate_items(list(range(rec.num_items))),
                                                     include_mlm=False, pooled_only=True) / 3
                if flops:
                    row["model_tflops_per_s"] = round(flops / seconds / 1e12, 4)
                    row["fraction_of_bf16_matmul"] = round(flops / seconds / rates["bf16"], 3)
                results[workload][name] = row
            print(_format(workload, results[workload]), flush=True)
            record.update(results=results, ratios=_ratios(results))  # kept if a later workload fails
        rec.item_table = None
        profile = [] if args.quick or "stage1" not in args.workloads else profile_top(
            lambda: runners.get("reolm-bf16", runners[args.configs[-1]]).stage1())
    ratios = _ratios(results)
    path = record.finish(profile_reolm_bf16_stage1_top10=profile)
    print(f"ratios: {ratios}\nwrote {path}")
    return 0


def _ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Speed of reolm-bf16 over each other configuration, per workload (same work: time ratio)."""
    out: dict[str, dict[str, float]] = {}
    for workload, rows in results.items():
        if "reolm-bf16" in rows:
            mine = rows["reolm-bf16"]["seconds"]
            out[workload] = {f"reolm-bf16_vs_{name}": round(row["seconds"] / mine, 2)
                             for name, row in rows.items() if name != "reolm-bf16"}
    return out


def _format(workload: str, rows: dict[str, dict[str, Any]]) -> str:
    lines = [f"{workload:<10} {'config':<11} {'seconds':>8} {'tokens/s':>10} {'of bf16 mm':>10}"]
    for name, row in rows.items():
        frac = row.get("fraction_of_bf16_matmul")
        lines.append(f"{'':<10} {name:<11} {row['seconds']:>8.3f} {row['tokens_per_s']:>10.0f} "
                     f"{'' if frac is None else f'{frac:.2f}':>10}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
