"""CPU benchmark: one training step (forward + backward) on a packed vs a padded batch.

Same sequences, same model, same attention backend (sdpa); the only difference is the layout:
packed = sequences concatenated (cu_seqlens), padded = every sequence padded to the longest.
Both are measured in one run, interleaved, and the median of the repeats is reported.

    PYTHONPATH=. python bench/packing.py [--batch-size 16] [--repeats 3]

Writes bench/results/packing_cpu.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import (collator, machine, save_random_roberta, synthetic_examples, synthetic_tables,
                    training_loss, write_result)
from reolm.data.collate import split_sequences
from reolm.data.tables import load_tokenizer
from reolm.model import ModelConfig, ReoLM

VOCAB = 4096  # keeps the MLM head ~10% of the step, as with L12 H384 and a 50k vocabulary


def step_seconds(model: ReoLM, batch: dict) -> float:
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    training_loss(model, batch).backward()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=12, help="sequences per batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per layout (after one warm-up)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--bucket-ratio", type=float, default=ModelConfig.attention_bucket_ratio,
                        help="attention length-group ratio of the packed layout (0 = one padded grid)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 = least disturbed by other work on a shared machine)")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write the JSON")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg = ModelConfig(attention="sdpa", attention_bucket_ratio=args.bucket_ratio, num_adapters=8, adapter_rank=16, image_feature_dim=64,
                      max_tokens=args.max_tokens, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_random_roberta(Path(tmp), args.layers, args.hidden, heads=max(1, args.hidden // 64), vocab=VOCAB)
        model = ReoLM.from_backbone(tmp, cfg).train()
        tokenizer = load_tokenizer(tmp)  # read before the folder goes
    tokens, images = synthetic_tables(5000, VOCAB, cfg.image_feature_dim)
    examples = synthetic_examples(args.batch_size, len(tokens), cfg.num_adapters)
    batches = {layout: collator(tokens, images, tokenizer, model.config, layout)(examples)
               for layout in ("packed", "padded")}
    same = [torch.equal(a, b) for a, b in zip(*(split_sequences(batches[k].history.input_ids, batches[k].history)
                                                 for k in batches))]
    assert all(same), "packed and padded batches must hold the same sequences"

    times: dict[str, list[float]] = {"packed": [], "padded": []}
    for layout in times:  # warm-up
        step_seconds(model, batches[layout])
    for _ in range(args.repeats):
        for layout in times:
            times[layout].append(step_seconds(model, batches[layout]))
    packed, padded = (statistics.median(times[k]) for k in ("packed", "padded"))
    hist = batches["packed"].history
    batch_info = {
        "sequences": args.batch_size,
        "items_per_sequence": "log-uniform 1-50 (after the 50-item / max_tokens budget)",
        "tokens_per_item": "20-100 text + 1 image",
        "history_tokens_real": hist.num_real_tokens,
        "history_tokens_padded": batches["padded"].history.num_tokens,
        "max_seqlen": hist.max_seqlen,
        "model": f"L{args.layers} H{args.hidden} A8 r16, vocab {VOCAB}, attention sdpa, fp32",
        "attention_groups_packed": hist.attn_groups,
        "repeats": args.repeats,
    }
    result = {"machine": machine(), "batch": batch_info, "packed_seconds": round(packed, 4),
              "padded_seconds": round(padded, 4), "speedup": round(padded / packed, 3),
              # other work on a shared machine only adds time: the minima are the least disturbed
              "min_seconds": {k: round(min(v), 4) for k, v in times.items()},
              "speedup_of_minima": round(min(times["padded"]) / min(times["packed"]), 3)}
    print(f"{'layout':8} {'tokens':>8} {'step s':>8}")
    print(f"{'packed':8} {hist.num_real_tokens:8d} {packed:8.3f}")
    print(f"{'padded':8} {batch_info['history_tokens_padded']:8d} {padded:8.3f}")
    print(f"speedup packed vs padded: {padded / packed:.2f}x (medians), "
          f"{min(times['padded']) / min(times['packed']):.2f}x (minima)")
    if not args.no_write:
        print("wrote", write_result("packing_cpu.json", result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
