#!/usr/bin/env python
"""Reo-LM fine-tuning speed and memory on one GPU, and full ranking there, on a domain shaped like
the real ones.

The domain is synthetic with the counts of amazon4 Tools (10,962 users, 5,820 items, 66,164
interactions; three attributes, no images). The backbone is --backbone (default: .whl/backbone,
the fp16 copy of all-MiniLM-L6-v2 that `bench/build_wheelhouse.sh --backbone DIR` stores), else
a random-weight BERT of the same shape (6 layers, H384, 12 heads; speed and memory depend on
the shape, not the weights) with a WordPiece vocabulary trained on the domain. As the trainer runs
it on CUDA: fp32 weights, bf16 autocast, attention auto (resolved from autocast's dtype), no
gradient checkpointing. Measures stage-1 steps/s (16 histories + 1,000 negatives with gradient,
+ 0.1 MLM) and peak memory, catalogue encoding items/s, stage-2 steps/s (frozen item table, full
softmax) and full ranking of every test user against all items (users/s); steps/s include
collating each batch and its copy to the GPU. Writes bench/results/finetune_gpu.json (or --out),
rewritten after each measurement ("complete": false until the last).

    python bench/finetune_gpu.py [--backbone HF_DIR] [--steps 30] [--workdir DIR] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

from finetune_memory import build, train_steps  # noqa: E402

TOOLS_SHAPE = ("Tools", 10_962, 5_820, 66_164)


def make_inputs(work: Path, backbone: str | None) -> tuple[Path, str, str]:
    """(domain folder, backbone dir, what the backbone is)."""
    from reolm.data.synth import DomainSpec, SynthConfig, generate_corpus
    from reolm.data.tokenizer import item_texts, train_tokenizer
    from reolm.random_init import init_backbone

    name, users, items, interactions = TOOLS_SHAPE
    (domain,) = generate_corpus(SynthConfig(domains=(DomainSpec(name, "downstream", users, items, interactions),),
                                            images=False), work / "data", seed=0, progress=False)
    default = REPO / ".whl" / "backbone"
    if backbone is None and (default / "config.json").is_file():
        backbone = str(default)
    if backbone:
        return domain, backbone, f"{backbone} (a real checkpoint)"
    tok = train_tokenizer(item_texts([domain]), work / "tok", vocab_size=8192, progress=False)
    return domain, str(init_backbone(tok, work / "bb", size="minilm-l6-h384")), \
        "random weights, all-MiniLM-L6-v2 shape (L6 H384 12 heads), vocab 8192"


def timed(fn) -> tuple[object, float]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=None, help="local HF checkpoint (default: .whl/backbone or random)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per stage (after 3 warm-up steps)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--negatives", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default="finetune_gpu.json",
                        help="result JSON: a file name under bench/results/, or a path")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("finetune_gpu.py: no CUDA device", file=sys.stderr)
        return 2
    from common import PartialResult, machine
    from reolm.data.domain import read_domain
    from reolm.eval.evaluate import evaluate_recommender
    from reolm.finetune.reolm_trainer import PrefixCollate

    work = Path(args.workdir or tempfile.mkdtemp(prefix="reolm_ft_gpu_"))
    domain_dir, backbone, what = make_inputs(work, args.backbone)
    rec, dataset, collate = build(backbone, str(domain_dir), args.negatives, device="cuda", attention="auto",
                                  max_tokens=args.max_tokens, gradient_checkpointing=False)
    result = PartialResult(args.out, benchmark="finetune_gpu", backbone=what, domain_shape=dict(zip(
        ("name", "users", "items", "interactions"), TOOLS_SHAPE)), batch_size=args.batch_size,
        negatives=args.negatives, max_tokens=args.max_tokens, precision="fp32 weights, bf16 autocast",
        machine=machine("cuda"))
    torch.cuda.reset_peak_memory_stats()
    stage1 = train_steps(rec, dataset, collate, args.batch_size, args.steps + 3)[3:]
    result.update(attention_backends_used=sorted(set(rec.model._backend_cache.values())),
                  stage1_steps_per_s=round(len(stage1) / sum(stage1), 3),
                  stage1_peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    table, encode_s = timed(rec.encode_all_items)
    rec.item_table = table
    result.update(encode_items_per_s=round(rec.num_items / encode_s, 1))
    torch.cuda.reset_peak_memory_stats()
    stage2_collate = PrefixCollate(rec.collator(0.0, seed=0), rec.num_items, negatives=None)  # labels = item ids
    stage2 = train_steps(rec, dataset, stage2_collate, args.batch_size, args.steps + 3, mlm_weight=0.0)[3:]
    result.update(stage2_steps_per_s=round(len(stage2) / sum(stage2), 3),
                  stage2_peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    ranking, rank_s = timed(lambda: evaluate_recommender(rec, read_domain(domain_dir), "test", batch_size=512,
                                                         progress=False))
    path = result.finish(ranking_users=ranking.num_users, ranking_users_per_s=round(ranking.num_users / rank_s, 1),
                         ranking_note="user encoding + scoring against all items + metrics, stage-2 table")
    print(f"wrote {path}")
    print({k: v for k, v in result.doc.items() if k.endswith(("_per_s", "_gib"))})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
