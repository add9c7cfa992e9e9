"""Whole runs on one GPU, as users start them (bench/gpu_acceptance.sh runs each file step on its
own time limit): fine-tuning through launch/finetune.py and launch/evaluate.py, 1-GPU DeepSpeed
pre-training stopped by SIGTERM and resumed, and an fp32 training run on CUDA against the same
run on CPU.  Every test needs CUDA; without it they skip."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from gpu_marks import cuda
from launch_helpers import (LAUNCH_TIMEOUT, REPO, base_overrides, deepspeed_cmd, kill_tree, metrics, run_env,
                            run_logged, wait_for_steps)


def _run_finetune(domain: Path, backbone: Path, out: Path, log: Path) -> None:
    """launch/finetune.py --model reolm on CUDA, reolm.num_workers left automatic (2 workers with
    pinned memory there); stage 2 cannot improve (its lr of 1e-12 is below fp32's resolution of the
    weights) so its early stopping must end it."""
    cmd = [sys.executable, str(REPO / "launch" / "finetune.py"), "--model", "reolm", "--domain", str(domain),
           "--backbone", str(backbone), "--out", str(out), "train.device=cuda", "train.progress=false",
           "train.seed=0", "reolm.model.num_adapters=2", "reolm.model.adapter_rank=8", "reolm.model.max_tokens=128",
           "reolm.model.image_feature_dim=8", "reolm.negatives=40", "reolm.item_batch_size=64",
           "reolm.stage1.epochs=3", "reolm.stage1.lr=2e-3", "reolm.stage1.batch_size=32",
           "reolm.stage1.warmup_steps=0", "reolm.stage1.evals_per_epoch=1",
           "reolm.stage2.epochs=4", "reolm.stage2.lr=1e-12", "reolm.stage2.batch_size=32", "reolm.stage2.warmup_steps=0",
           "reolm.stage2.evals_per_epoch=1", "reolm.stage2.patience=1", "eval.batch_size=64"]
    run_logged(cmd, log)


@cuda
def test_finetune_launch_end_to_end_on_cuda(tmp_path):
    from conftest import tiny_downstream_domain

    from reolm.data.tokenizer import item_texts, train_tokenizer
    from reolm.random_init import init_backbone

    domain = tiny_downstream_domain(tmp_path)
    tok = train_tokenizer(item_texts([domain]), tmp_path / "tok", kind="words", vocab_size=2000, progress=False)
    backbone = init_backbone(tok, tmp_path / "bert", size="tiny", max_position_embeddings=128)
    run = tmp_path / "run"
    _run_finetune(domain, backbone, run, tmp_path / "finetune.log")
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert records[0]["gradient_checkpointing"] is False  # automatic: off on GPUs
    stage2 = [r for r in records if r.get("stage") == "reolm-stage2" and "train_loss" in r]
    assert 1 <= len(stage2) < 4  # stopped early
    doc = json.loads((run / "metrics.json").read_text())
    assert doc["stage2"]["stopped_early"] is True and doc["stage1"]["epochs_run"] == 3
    out = tmp_path / "evaluated.json"
    run_logged([sys.executable, str(REPO / "launch" / "evaluate.py"), "--domain", str(domain), "--model", str(run),
                "--split", "test", "--out", str(out), "--device", "cuda", "--no-progress"], tmp_path / "evaluate.log")
    again = json.loads(out.read_text())
    for name, value in doc["metrics"].items():  # the same weights and the same ranking, re-loaded
        assert again["metrics"][name] == pytest.approx(value, abs=1e-6), name


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@cuda
def test_one_gpu_deepspeed_pretraining_stops_on_sigterm_and_resumes(pretrain_inputs, tmp_path):
    """`deepspeed --num_gpus 1` on the tiny corpus (bf16 on the GPU): a periodic checkpoint, then
    SIGTERM to the launcher's process group saves the current step and stops the run cleanly;
    --resume latest continues from it."""
    run_dir = tmp_path / "run"
    overrides = base_overrides(pretrain_inputs, run_dir, **{"optim.steps": 100000, "log.every": 1, "val.every": 0,
                                                            "ckpt.every": 5, "data.num_workers": 1})
    log = tmp_path / "log.txt"
    with open(log, "wb") as out:
        proc = subprocess.Popen(deepspeed_cmd(1, overrides), stdout=out, stderr=subprocess.STDOUT, env=run_env(),
                                cwd=REPO, start_new_session=True)
    # The launcher has a session of its own: should this test be stopped (the acceptance step's time
    # limit), the finally clause must still end it rather than leave it holding the GPU.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    tree: list = []
    try:
        wait_for_steps(run_dir, 7, proc, log)
        tree = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
        _, alive = psutil.wait_procs(tree, timeout=120)  # the rank saves its checkpoint after the launcher exits
        assert not alive, alive
    finally:
        kill_tree(proc)
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.kill()
        signal.signal(signal.SIGTERM, previous)
    text = log.read_text()
    assert "stopped after step" in text and "killed by signal" not in text, text[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "stopped"
    first = metrics(run_dir)
    last_step = first[-1]["step"]
    assert last_step >= 7 and (run_dir / "checkpoints" / "latest").read_text() == f"step-{last_step:08d}"
    kept = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")]
    assert any(step % 5 == 0 for step in kept), kept  # a periodic one (ckpt.every 5) besides the stop's
    assert json.loads((run_dir / "ds_config.json").read_text())["bf16"]["enabled"] is True
    lines_before = len((run_dir / "metrics.jsonl").read_text().splitlines())
    resume = base_overrides(pretrain_inputs, run_dir, **{"optim.steps": last_step + 3, "log.every": 1,
                                                         "val.every": 0, "ckpt.every": 5, "data.num_workers": 1})
    run_logged(deepspeed_cmd(1, resume + ["--resume", "latest"]), tmp_path / "resume.txt", timeout=LAUNCH_TIMEOUT)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()[lines_before:]]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [last_step + 1, last_step + 2, last_step + 3]
    assert "resumed from" in (tmp_path / "resume.txt").read_text()


def _loss_curve(model: torch.nn.Module, batches: list, device: str, steps: int) -> list[float]:
    """Losses of ``steps`` AdamW steps (fp32, no autocast) of the pre-training objective."""
    from reolm.model.objectives import info_nce

    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)].to(device)
        optimizer.zero_grad()
        out = model(batch.history, pooled_only=True)
        loss = (info_nce(out.pooled, model.encode(batch.target), model.config.temperature).loss
                + 0.1 * model.mlm_loss(out, batch.history))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@cuda
def test_fp32_training_on_cuda_follows_the_cpu_loss_curve(tmp_path):
    """The same 12 fp32 steps (same weights, same batches and masks) on CUDA and on CPU: the loss
    curves agree within 1e-3 relative, and training moved the loss."""
    from reolm.data.collate import SequenceExample
    from tiny_models import tiny_collator, tiny_reolm, tiny_tables

    tokens, images = tiny_tables(num_items=40)
    collate = tiny_collator(tokens, images, seed=0)
    batches = [collate([SequenceExample(list(range(s, s + n)), (s + n) % 40, d)
                        for s, n, d in [(b, 3, 0), (b + 5, 5, 1), (b + 11, 2, 2), (b + 17, 4, 3)]]) for b in range(3)]
    curves = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = tiny_reolm(tmp_path / device, attention="sdpa")  # auto on CUDA in fp32 resolves to sdpa too
        curves[device] = _loss_curve(model, batches, device, 12)
    assert curves["cuda"] == pytest.approx(curves["cpu"], rel=1e-3), curves
    assert curves["cpu"][-1] < 0.97 * curves["cpu"][0]  # it learned (~6% in 12 steps)
