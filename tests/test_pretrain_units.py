"""Unit tests of the pre-training pieces: losses (incl. the gathered InfoNCE), DeepSpeed config
filling, lr schedule, checkpoint rotation/atomicity, bad-sample handling of the stream."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml

from reolm.config import ConfigError
from reolm.model.objectives import info_nce, masked_lm_loss, mlm_predictions
from reolm.train.checkpoint import CheckpointManager
from reolm.train.checkpoint_files import ResumePlan, complete_checkpoints, step_tag
from reolm.train.config import DataConfig, PretrainOptimConfig
from reolm.train.data import (BadSampleCounter, DataError, Readers, SeededCollate, ShardStream, StreamPosition,
                              StreamTracker, TrainStream, decode_example, default_num_workers, expand_shards)
from reolm.train.distributed import slurm_env
from reolm.train.ds_config import batch_layout, fill_ds_config, load_ds_config, lr_scheduler_factory
from reolm.train.losses import PretrainLoss

from launch_helpers import free_port, run_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- losses

def _loss_inputs(seed: int = 0, rows: int = 8, dim: int = 6, vocab: int = 11):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randn(rows, dim, generator=g)
    tgt = torch.randn(rows, dim, generator=g)
    logits = torch.randn(rows * 3, vocab, generator=g)
    labels = torch.randint(0, vocab, (rows * 3,), generator=g)
    labels[torch.rand(rows * 3, generator=g) < 0.5] = -100
    return hist, tgt, logits, labels


def _gathered_worker(rank: int, world: int, port: int, out: dict) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    hist, tgt, logits, labels = _loss_inputs()
    rows, toks = hist.shape[0] // world, logits.shape[0] // world
    # Uneven masked-token counts per rank: the MLM normalisation must still match.
    h = hist[rank * rows:(rank + 1) * rows].clone().requires_grad_(True)
    t = tgt[rank * rows:(rank + 1) * rows].clone().requires_grad_(True)
    lg = logits[rank * toks:(rank + 1) * toks].clone().requires_grad_(True)
    parts = PretrainLoss(0.05, 0.1, "global")(h, t, lg, labels[rank * toks:(rank + 1) * toks])
    parts.total.backward()
    # DeepSpeed divides every rank's gradient contribution by the world size (mean over ranks).
    grads = [x.grad / world for x in (h, t, lg)]
    total = parts.total.detach().clone()
    dist.all_reduce(total)
    out[rank] = {"loss": (total / world).item(), "grads": [g.numpy() for g in grads]}
    dist.destroy_process_group()


def _spawn(worker, world: int) -> dict:
    """Run ``worker(rank, world, port, out)`` on ``world`` gloo ranks; returns ``out`` by rank."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(world, free_port(), out), nprocs=world, join=True)
        return dict(out)


def test_gathered_infonce_equals_single_process_on_concatenated_batch():
    world = 2
    results = _spawn(_gathered_worker, world)
    hist, tgt, logits, labels = _loss_inputs()
    h, t, lg = (x.clone().requires_grad_(True) for x in (hist, tgt, logits))
    single = PretrainLoss(0.05, 0.1, "global")(h, t, lg, labels)
    single.total.backward()
    # Each rank's (averaged) gradient of its own rows equals the full-batch gradient of those rows.
    rows, toks = hist.shape[0] // world, logits.shape[0] // world
    for rank in range(world):
        assert results[rank]["loss"] == pytest.approx(single.total.item(), rel=1e-5)
        gh, gt, glg = results[rank]["grads"]
        full = [h.grad, t.grad, lg.grad]
        for g, f, n in ((gh, full[0], rows), (gt, full[1], rows), (glg, full[2], toks)):
            np.testing.assert_allclose(g, f[rank * n:(rank + 1) * n].numpy(), rtol=1e-4, atol=1e-6)


def _bf16_keys_worker(rank: int, world: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    from reolm.model.objectives import gathered_keys
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    keys = torch.ones(2, 3, dtype=torch.bfloat16, requires_grad=True)
    gathered = gathered_keys(keys)
    # Rank 0's loss pulls every key by 1, the others by 2**-8: summed in bf16 (ulp 2**-7 at 1) the
    # small parts round away one by one; summed in fp32 they add up to 1 + 2**-7, exact in bf16.
    gathered.backward(torch.full(gathered.shape, 1.0 if rank == 0 else 2.0 ** -8))
    out[rank] = {"dtype": str(gathered.dtype), "rows": gathered.shape[0], "grad": keys.grad.float().tolist(),
                 "grad_dtype": str(keys.grad.dtype)}
    dist.destroy_process_group()


def test_gathered_negatives_sum_their_gradients_in_fp32():
    world = 3
    results = _spawn(_bf16_keys_worker, world)
    for rank in range(world):
        r = results[rank]
        assert (r["dtype"], r["rows"], r["grad_dtype"]) == ("torch.float32", 2 * world, "torch.bfloat16")
        assert r["grad"] == [[1.0 + 2.0 ** -7] * 3] * 2


def test_infonce_is_low_for_aligned_pairs_and_masks_duplicates():
    torch.manual_seed(0)
    v = torch.randn(6, 8)
    aligned, correct = info_nce(v, v, temperature=0.05, gather=False)
    shuffled, _ = info_nce(v, v[torch.randperm(6)], temperature=0.05, gather=False)
    assert aligned.item() < 0.05 < shuffled.item()
    assert correct.item() == 6
    # Rows 0 and 1 hold the same target item: as negatives for each other they would be perfect
    # confusers; masking them leaves only the true negatives.
    t = v.clone()
    t[1] = t[0]
    ids = torch.tensor([5, 5, 1, 2, 3, 4])
    unmasked, _ = info_nce(v, t, 0.05, gather=False)
    masked, _ = info_nce(v, t, 0.05, gather=False, key_ids=ids)
    assert masked.item() < unmasked.item()


def test_mlm_loss_is_mean_over_masked_tokens_on_one_rank():
    _, _, logits, labels = _loss_inputs()
    loss, count, correct = masked_lm_loss(logits, labels, gather=True)
    valid = labels != -100
    expected = torch.nn.functional.cross_entropy(logits[valid], labels[valid])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert count.item() == int(valid.sum())
    assert correct.item() == int((logits.argmax(-1) == labels)[valid].sum())


# ----------------------------------------------------------------------------- DeepSpeed config

@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_ds_configs_fill_every_auto_field(name):
    template = load_ds_config(os.path.join(REPO, "ds_configs", f"{name}.json"))
    optim = PretrainOptimConfig(micro_batch_size=4, global_batch_size=64, lr=3e-4, grad_clip=0.5, schedule="cosine",
                        warmup_steps=10, steps=100, min_lr_ratio=0.1)
    cfg = fill_ds_config(template, optim, world_size=8, device_type="cpu", hidden_size=32)
    text = json.dumps(cfg)
    assert '"auto"' not in text
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 64 and cfg["gradient_clipping"] == 0.5
    assert cfg["optimizer"]["params"]["lr"] == 3e-4
    assert cfg["data_types"]["grad_accum_dtype"] == "fp32"
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False  # CPU -> fp32
    assert "scheduler" not in cfg  # ours, passed to deepspeed.initialize (lr_scheduler_factory)
    assert cfg["zero_optimization"]["stage"] == (1 if name == "zero1" else 2 if name == "zero2" else 3)
    if name == "zero3_offload":
        assert cfg["optimizer"]["params"]["torch_adam"] is False  # the explicit value wins


def test_ds_config_errors_are_clear():
    optim = PretrainOptimConfig(micro_batch_size=3, global_batch_size=64)
    with pytest.raises(ConfigError, match="not a multiple"):
        batch_layout(optim, 2)
    template = {"train_micro_batch_size_per_gpu": 16}
    with pytest.raises(ConfigError, match="contradicts"):
        fill_ds_config(template, PretrainOptimConfig(micro_batch_size=4), 1, "cpu")
    with pytest.raises(ConfigError, match="still has"):
        fill_ds_config({"foo": {"bar": "auto"}}, PretrainOptimConfig(), 1, "cpu")
    with pytest.raises(ConfigError, match="needs a GPU"):
        fill_ds_config({}, PretrainOptimConfig(precision="fp16"), 1, "cpu")


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_lr_schedule_warms_up_then_decays(schedule):
    optim = PretrainOptimConfig(lr=1e-3, warmup_steps=10, steps=50, schedule=schedule, min_lr_ratio=0.1)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr)
    sched = lr_scheduler_factory(optim)(opt)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4)  # the first step already learns
    assert lrs[4] == pytest.approx(5e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup to the peak
    assert max(lrs) == pytest.approx(1e-3)
    if schedule == "constant":
        assert lrs[-1] == pytest.approx(1e-3)
    elif schedule == "linear":
        assert lrs[30] == pytest.approx(1e-4 + 9e-4 * (1 - 21 / 41))
        assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    else:
        assert lrs[30] == pytest.approx(1e-3 * (0.1 + 0.9 * (1 + np.cos(np.pi * 21 / 41)) / 2))
        assert 1e-4 < lrs[-1] < 1.05e-4  # approaches min_lr_ratio x lr


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_save_load_with_a_real_engine(tmp_path, world_of_one):
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ds_cfg = fill_ds_config(load_ds_config(os.path.join(REPO, "ds_configs", "zero2.json")),
                            PretrainOptimConfig(micro_batch_size=2, steps=10, warmup_steps=0), 1, "cpu")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg,
                                      lr_scheduler=lr_scheduler_factory(PretrainOptimConfig(steps=10, warmup_steps=0)))
    x = torch.randn(2, 4)
    engine.backward(engine(x).pow(2).sum())
    engine.step()
    from tiny_models import Held
    trainer = Held({"step": 1})
    streams = StreamTracker(Readers(rank=0, world_size=1, workers=1, replicate=False), {0: StreamPosition(3, 7)})
    ckpt = CheckpointManager(tmp_path / "ckpt", keep_last=1)
    ckpt.register(shared={"trainer": trainer}, per_rank={"data": streams},
                  write_extra=lambda folder: (folder / "extra.txt").write_text("x"))
    path = ckpt.save(engine, 1)
    assert (path / "extra.txt").is_file() and (path / "rank-00000.json").is_file()
    assert not list(path.glob("rank-*.pt"))  # our state is JSON + arrays, no pickle
    manifest = json.loads((path / "manifest.json").read_text())
    assert "sha256" in manifest["files"]["extra.txt"] and manifest["world_size"] == 1 and manifest["step"] == 1
    assert (tmp_path / "ckpt" / "latest").read_text() == path.name
    expected = engine.module.weight.detach().clone()
    engine.backward(engine(x).pow(2).sum())
    engine.step()
    assert not torch.equal(engine.module.weight, expected)
    trainer.state["step"], streams.positions = 2, {}
    ckpt.save(engine, 2)
    assert [p.name for p in complete_checkpoints(tmp_path / "ckpt")] == [step_tag(2)]  # keep_last=1
    after_two = engine.module.weight.detach().clone()
    engine.backward(engine(x).pow(2).sum())
    engine.step()
    streams.positions = {0: StreamPosition(9, 9)}
    shared = ckpt.load(engine, ResumePlan(tmp_path / "ckpt" / step_tag(2), universal=False, same_layout=True))
    assert shared["step"] == 2 and shared["world_size"] == 1 and trainer.loaded == shared
    assert streams.positions == {} and streams.bad_counts() == {}
    assert torch.equal(engine.module.weight, after_two)  # weights restored
    assert engine.lr_scheduler.last_epoch == 2  # scheduler state restored


def test_pretraining_forwards_run_the_last_layer_on_cls_rows_only(tmp_path, world_of_one):
    """The losses read pooled vectors and the MLM hidden states only: both forwards of a
    micro-step run the last layer's queries on the [CLS] rows, with the losses of full forwards,
    and the FLOPs counted are those of these forwards."""
    from reolm.data.collate import SequenceExample
    from reolm.train.metrics import Window
    from reolm.train.step import forward_losses
    from tiny_models import tiny_collator, tiny_tables, tiny_zero2_engine

    engine, model = tiny_zero2_engine(tmp_path / "backbone")
    tokens, images = tiny_tables(num_items=30)
    batch = tiny_collator(tokens, images, seed=0)([SequenceExample([1, 2, 3], 9, 1), SequenceExample([4, 5], 10, 0),
                                                   SequenceExample([6, 7, 8, 11], 12, 2)])
    loss_fn = PretrainLoss(0.05, 0.1, "local")
    query_rows = []
    hook = model.encoder.layer[-1].attention.self.query.register_forward_hook(
        lambda module, inputs, output: query_rows.append(inputs[0].shape[0]))
    with torch.no_grad():
        parts = forward_losses(engine, batch, loss_fn)
    hook.remove()
    assert query_rows == [batch.history.num_sequences, batch.target.num_sequences] == [3, 3]
    with torch.no_grad():
        hist, tgt = model(batch.history), model(batch.target)  # full forwards: every token's last layer
        full = loss_fn(hist.pooled, tgt.pooled, *mlm_predictions(model, hist, batch.history),
                       target_ids=batch.target_items)
    assert parts.total.item() == pytest.approx(full.total.item(), rel=1e-5) and parts.mlm_tokens.item() > 0
    window = Window()
    window.count_batch(batch, model)
    counted = (model.training_flops(batch.history, pooled_only=True)
               + model.training_flops(batch.target, include_mlm=False, pooled_only=True))
    assert window.flops == counted < model.training_flops(batch.history) + model.training_flops(
        batch.target, include_mlm=False)


def test_nonfinite_loss_skips_the_step_and_aborts_after_n_in_a_row(world_of_one):
    """DeepSpeed (ZeRO-2, fp32 on CPU, clipping on) refuses a NaN gradient; the guard counts and aborts."""
    import deepspeed

    from reolm.train.trainer import NonFiniteGuard, TrainingAborted

    model = torch.nn.Linear(4, 1)
    optim = PretrainOptimConfig(micro_batch_size=2, steps=10, warmup_steps=0, grad_clip=1.0)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=fill_ds_config(load_ds_config(os.path.join(REPO, "ds_configs",
                                                                                        "zero2.json")),
                                                            optim, 1, "cpu"),
                                      lr_scheduler=lr_scheduler_factory(optim))
    guard = NonFiniteGuard(max_in_a_row=2)
    before = engine.module.weight.detach().clone()
    x = torch.randn(2, 4)
    engine.backward(engine(x).sum() * float("nan"))
    engine.step()
    assert guard.update(engine.was_step_applied(), 1) is True  # skipped, weights untouched
    assert torch.equal(engine.module.weight, before)
    engine.backward(engine(x).sum())
    engine.step()
    assert guard.update(engine.was_step_applied(), 2) is False and guard.in_a_row == 0
    assert not torch.equal(engine.module.weight, before)
    guard.update(False, 3)
    with pytest.raises(TrainingAborted, match="2 optimizer steps in a row"):
        guard.update(False, 4)


# ----------------------------------------------------------------------------- data stream

def _write_tar(path, samples, corrupt_at: int | None = None):
    import webdataset as wds
    with wds.TarWriter(str(path)) as sink:
        for key, record in samples:
            sink.write({"__key__": key, "json": record if isinstance(record, bytes) else json.dumps(record).encode()})
    if corrupt_at is not None:
        data = bytearray(path.read_bytes())
        data[corrupt_at:corrupt_at + 600] = os.urandom(600)
        path.write_bytes(bytes(data))


def test_shard_stream_resumes_exactly_and_counts_bad_samples(tmp_path):
    shards = []
    for s in range(3):
        path = tmp_path / f"train-{s:06d}.tar"
        _write_tar(path, [(f"d0_u{s}_{i}", {"domain": 0, "user": s * 10 + i, "items": [i, i + 1, i + 2]})
                          for i in range(5)])
        shards.append(str(path))
    counter = BadSampleCounter(max_logs=0)
    stream = ShardStream(shards, seed=1, stream_id=0, num_streams=1, resample=True, counter=counter)
    it = iter(stream)
    first = [next(it)["__key__"] for _ in range(12)]
    pos = StreamPosition(stream.position.draw, stream.position.offset)
    rest = [next(it)["__key__"] for _ in range(8)]
    resumed = iter(ShardStream(shards, seed=1, stream_id=0, num_streams=1, resample=True, counter=counter,
                               start=pos))
    assert [next(resumed)["__key__"] for _ in range(8)] == rest
    assert len(set(first)) > 5  # draws differ

    with pytest.raises(DataError, match="without resampling"):
        ShardStream(shards, 0, 0, 4, resample=False, counter=counter)
    # The per-rank dataset checks the whole layout (ranks x workers) before any worker starts.
    with pytest.raises(DataError, match="3 train shards for 4 readers"):
        TrainStream(DataConfig(resample=False, shuffle_buffer=4, shuffle_initial=2), shards,
                    lambda examples, seed: {}, micro_batch=2, num_items=10, seed=0,
                    readers=Readers(rank=0, world_size=2, workers=2, replicate=False))
    # Without resampling each reader owns a disjoint subset and a pass covers it exactly once.
    owned = [ShardStream(shards, 0, i, 3, resample=False, counter=counter) for i in range(3)]
    assert sorted(s for o in owned for s in o.shards) == shards
    it = iter(owned[1])
    assert sorted(next(it)["__key__"] for _ in range(5)) == [f"d0_u1_{i}" for i in range(5)]
    assert expand_shards(str(tmp_path / "train-{000000..000002}.tar")) == shards


def test_decode_example_skips_and_counts_bad_records():
    from reolm.data.collate import SequenceExample
    counter = BadSampleCounter(max_logs=1)
    ok = decode_example({"__key__": "a", "json": b'{"domain": 1, "user": 2, "items": [1, 2, 3]}'}, 10, counter)
    assert isinstance(ok, SequenceExample) and ok.history.dtype == np.int64
    assert ok.target == 3 and ok.history.tolist() == [1, 2] and (ok.domain, ok.user, ok.key) == (1, 2, "a")
    dev = decode_example({"__key__": "b", "json": b'{"domain": 0, "user": 2, "items": [1, 2], "target": 4}'},
                         10, counter)
    assert dev.target == 4 and dev.history.tolist() == [1, 2]  # whole: the collator cuts histories
    record = json.dumps({"domain": 0, "user": 3, "items": list(range(10)) * 10}).encode()
    assert len(decode_example({"__key__": "l", "json": record}, 10, counter).history) == 99
    assert decode_example({"__key__": "c", "json": b"{not json"}, 10, counter) is None
    assert decode_example({"__key__": "d", "json": b'{"domain": 0, "user": 1, "items": [1, 99]}'},
                          10, counter) is None
    assert decode_example({"__key__": "e", "json": b'{"domain": 0, "user": 1, "items": [1]}'}, 10,
                          counter) is None
    assert counter.counts == {"decode": 1, "index": 1, "short": 1}


def test_train_stream_skips_corrupt_tar_and_keeps_fixed_batch_size(tmp_path):
    good = tmp_path / "train-000000.tar"
    _write_tar(good, [(f"d0_u{i}", {"domain": 0, "user": i, "items": [i % 7, (i + 1) % 7]}) for i in range(20)])
    bad = tmp_path / "train-000001.tar"
    _write_tar(bad, [(f"d0_u{i}", {"domain": 0, "user": i, "items": [1, 2]}) for i in range(20)], corrupt_at=2048)
    (tmp_path / "train-000002.tar").write_bytes(b"this is not a tar file at all" * 50)

    from reolm.data.batch import StreamInfo, TrainingBatch
    from tiny_models import tiny_collator, tiny_tables

    collate = SeededCollate(tiny_collator(*tiny_tables(num_items=7), mlm_probability=0.0))
    ds = TrainStream(DataConfig(resample=True, shuffle_buffer=8, shuffle_initial=4),
                     [str(good), str(bad), str(tmp_path / "train-000002.tar")], collate, micro_batch=4,
                     num_items=7, seed=0, readers=Readers(rank=0, world_size=1, workers=0, replicate=False))
    it = iter(ds)
    batches = [next(it) for _ in range(30)]
    assert all(isinstance(b, TrainingBatch) and b.num_sequences == len(b.keys) == b.target_items.shape[0] == 4
               for b in batches)
    assert all(k.startswith("s0/d") for k in batches[0].keys)  # the stream's source prefix, then the tar key
    assert isinstance(batches[-1].stream, StreamInfo) and batches[-1].stream.worker == 0
    assert batches[-1].stream.bad.get("tar", 0) >= 1


def test_default_workers_share_the_cores_between_local_ranks():
    cores = len(os.sched_getaffinity(0))
    assert default_num_workers(1) == max(0, min(8, cores - 1))
    assert default_num_workers(cores) == 0
    assert default_num_workers(10**6) == 0


def test_slurm_env_maps_ranks_and_first_host():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NNODES": "4",
           "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_JOB_ID": "1234"}
    out = slurm_env(env)
    assert out["RANK"] == "5" and out["WORLD_SIZE"] == "8" and out["LOCAL_RANK"] == "1"
    assert out["LOCAL_WORLD_SIZE"] == "2" and out["MASTER_ADDR"] == "gpu07"
    assert out["MASTER_PORT"] == str(15000 + 1234)


def test_slurm_script_builds_the_rendezvous_from_the_allocation(tmp_path):
    import subprocess
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\nprintf 'gpu07\\ngpu08\\n'\n")
    (fake / "scontrol").chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": str(tmp_path),
           "REOLM_DRY_RUN": "1"}
    script = os.path.join(REPO, "launch", "slurm", "pretrain.sbatch")
    out = subprocess.run(["bash", script, "--config", "c.yaml", "optim.lr=1e-4"], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert "--nnodes 2 --nproc-per-node 8" in out
    assert f"--rdzv-endpoint gpu07:{15000 + 4242}" in out and "--rdzv-id 4242" in out
    # A first start is fresh and claims the run dir; a requeued start resumes only its own run.
    assert out.rstrip().endswith("optim.lr=1e-4 run_dir=runs/pretrain-4242 ckpt.run_id=slurm:cluster:4242")
    assert "--shutdown-timeout 600" in out
    again = subprocess.run(["bash", script, "--config", "c.yaml"], env={**env, "SLURM_RESTART_COUNT": "1"},
                           capture_output=True, text=True, check=True).stdout
    assert again.rstrip().endswith("ckpt.run_id=slurm:cluster:4242 --resume auto")
    asked = subprocess.run(["bash", script, "--resume", "latest"], env={**env, "SLURM_RESTART_COUNT": "1"},
                           capture_output=True, text=True, check=True).stdout
    assert "--resume auto" not in asked and "--resume latest" in asked
    env["REOLM_SLURM_MODE"] = "tasks"
    out = subprocess.run(["bash", script], env=env, capture_output=True, text=True, check=True).stdout
    assert "--ntasks-per-node=8" in out and "launch/pretrain.py" in out and "torch.distributed.run" not in out


def test_pretrain_overrides_may_follow_resume(tmp_path):
    """The Slurm script appends run_dir=... after the user's own `--resume latest`: launch/pretrain.py
    (the script every rank runs) parses them in any order and resolves them into the config."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "pretrain.py"), "optim.lr=3e-4",
                           "--resume", "latest", f"run_dir={tmp_path / 'r'}", "ckpt.run_id=x", "--print-config"],
                          capture_output=True, text=True, cwd=REPO, env=run_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["optim"]["lr"] == 3e-4 and resolved["ckpt"]["resume"] == "latest"
    assert resolved["run_dir"] == str(tmp_path / "r") and resolved["ckpt"]["run_id"] == "x"


def test_orphaned_deepspeed_shm_files_are_removed_and_mapped_ones_kept(tmp_path):
    """DeepSpeed's 66 MiB allreduce files of runs killed during init are garbage once nobody maps
    them; a file still mapped (a live run) or just created (not mapped yet) must stay."""
    import mmap
    import time as _time
    from pathlib import Path

    from reolm.train.distributed import remove_orphaned_shm_buffers
    uid = os.getuid()
    old = _time.time() - 3600

    def make(name: str, mtime: float) -> Path:
        path = tmp_path / f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_{name}"
        path.write_bytes(b"\0" * 4096)
        os.utime(path, (mtime, mtime))
        return path

    orphan, fresh, live = make("1111_0", old), make("2222_0", _time.time()), make("3333_1", old)
    other_user = tmp_path / f"deepspeed_allreduce_buffer_{uid + 1}_127.0.0.1_4444_0"
    other_user.write_bytes(b"\0")
    os.utime(other_user, (old, old))
    with open(live, "r+b") as handle, mmap.mmap(handle.fileno(), 4096):
        removed = remove_orphaned_shm_buffers(max_age_s=600, shm_dir=tmp_path)
    assert removed == [orphan]
    assert not orphan.exists() and fresh.exists() and live.exists() and other_user.exists()


# ----------------------------------------------------------------------------- CPU precision

def test_pretraining_precision_auto_on_cpu_follows_the_fine_tuning_rule(monkeypatch):
    """``optim.precision=auto`` on CPU is bf16 exactly where fine-tuning's rule says so (native bf16
    matmuls and a model at least 256 wide), and the DeepSpeed engine stays fp32 either way: CPU bf16
    is autocast over fp32 weights. fp16 is refused on CPU."""
    import reolm.precision as numerics
    from reolm.train.ds_config import engine_precision, resolve_precision

    template = load_ds_config(os.path.join(REPO, "ds_configs", "zero2.json"))
    for fast, hidden, expected in ((True, 384, "bf16"), (False, 384, "fp32"), (True, 128, "fp32")):
        monkeypatch.setattr(numerics, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert resolve_precision("auto", "cpu", hidden) == expected, (fast, hidden)
        cfg = fill_ds_config(template, PretrainOptimConfig(), 1, "cpu", hidden_size=hidden)
        assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False
    assert resolve_precision("bf16", "cpu", 32) == "bf16" and engine_precision("bf16", "cpu") == "fp32"
    assert engine_precision("bf16", "cuda") == "bf16"  # the GPU path is DeepSpeed's bf16 mode, as before
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        resolve_precision("fp16", "cpu")


def test_cpu_bf16_micro_step_runs_bf16_matmuls_with_fp32_weights_and_losses(tmp_path, world_of_one):
    """A CPU bf16 micro-step: the encoder's matmuls produce bf16, the losses stay fp32 and close to
    the fp32 step's, and the engine's weights stay fp32 and are updated."""
    from types import SimpleNamespace

    from reolm.data.collate import SequenceExample
    from reolm.train.distributed import DistInfo
    from reolm.train.metrics import DeviceAccumulator, Window
    from reolm.train.setup import RankContext
    from reolm.train.step import forward_losses, micro_step
    from tiny_models import tiny_collator, tiny_tables, tiny_zero2_engine

    engine, model = tiny_zero2_engine(tmp_path / "backbone")
    tokens, images = tiny_tables(num_items=30)
    batch = tiny_collator(tokens, images, seed=0)([SequenceExample([1, 2, 3], 9, 1), SequenceExample([4, 5], 10, 0),
                                                   SequenceExample([6, 7, 8, 11], 12, 2)])
    loss_fn = PretrainLoss(0.05, 0.1, "local")
    readers = Readers(rank=0, world_size=1, workers=0, replicate=False)
    ranks = {p: RankContext(info=DistInfo(), device=torch.device("cpu"), precision=p, readers=readers)
             for p in ("fp32", "bf16")}
    dtypes = []
    hook = model.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda module, inputs, output: dtypes.append(output.dtype))
    with torch.no_grad():
        fp32 = forward_losses(engine, batch, loss_fn, ranks["fp32"].autocast())
        bf16 = forward_losses(engine, batch, loss_fn, ranks["bf16"].autocast())
    assert dtypes == [torch.float32] * 2 + [torch.bfloat16] * 2  # history + target forwards of each
    assert bf16.total.dtype == torch.float32
    assert bf16.total.item() == pytest.approx(fp32.total.item(), rel=0.03)

    before = model.encoder.layer[0].attention.self.query.weight.detach().clone()
    setup = SimpleNamespace(engine=engine, rank=ranks["bf16"])
    acc = DeviceAccumulator()
    micro_step(setup, iter([batch]), loss_fn, Window(), acc, None, step=0)
    hook.remove()
    assert dtypes[-2:] == [torch.bfloat16] * 2  # micro_step autocasts through the rank's context
    weight = model.encoder.layer[0].attention.self.query.weight
    assert weight.dtype == torch.float32 and not torch.equal(weight.detach(), before)
