"""Multi-process pre-training runs on the tiny synthetic corpus, started the way users start them
(the `deepspeed` launcher and `torchrun`), on CPU with gloo.  The slowest tests of the project:
each launch asserts several things.

* ZeRO-2, 2 ranks (deepspeed launcher), a corrupt tar among the train shards, killed with
  SIGKILL after a checkpoint and resumed with --resume latest (one run, in the module-scoped
  fixture ``zero2_run``; one test per property of its outputs): the loss decreases, validation
  Recall@10 beats random, the corrupt shard is skipped and counted, the step counter and the
  loss continue, no sample is replayed and at most one shuffle buffer is skipped; the export
  reproduces the engine's weights and outputs.
* ZeRO-3, 2 ranks (deepspeed launcher): learns; the export (consolidating sharded parameters)
  reproduces the run's own final validation metrics.
* 1 rank x 2 accumulation steps == 2 ranks x 1 (the 2 ranks being two simulated nodes: two
  torchrun processes with a c10d rendezvous on 127.0.0.1) in loss trajectory.
* SIGTERM to the torchrun agent, the deepspeed launcher's process group or the deepspeed runner alone,
  with DataLoader workers: the ranks checkpoint the same step, exit 0, nothing is orphaned, and
  --resume latest continues.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from launch_helpers import BIN, LAUNCH_TIMEOUT, REPO, TINY
from launch_helpers import base_overrides as _base
from launch_helpers import consumed as _consumed
from launch_helpers import deepspeed_cmd as _deepspeed
from launch_helpers import free_port as _port
from launch_helpers import kill_tree as _kill_tree
from launch_helpers import metrics as _metrics
from launch_helpers import run_env as _env
from launch_helpers import run_logged as _run
from launch_helpers import wait_for_steps as _wait_for_steps

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(pretrain_inputs):
    return pretrain_inputs  # built once per session (tests/conftest.py)


def _assert_beats_random(val: dict, sigmas: float = 3.0) -> None:
    """Validation Recall@10 lies ``sigmas`` binomial standard deviations above the chance rate of
    the same candidate pool and users: a margin that means "learned", whatever the pool size."""
    chance, users = val["val_random_recall@10"], val["val_users"]
    threshold = chance + sigmas * (chance * (1 - chance) / users) ** 0.5
    assert val["val_recall@10"] > threshold, (val, threshold)


# ----------------------------------------------------------------------------- ZeRO-2 + kill/resume

def _corrupt(path: Path) -> None:
    """Cut the tar at a block boundary half-way: tarfile sees a clean end, only the manifest's
    sample count reveals the loss; and garble one JSON payload."""
    data = bytearray(path.read_bytes())
    first_payload = data.index(b'{"domain"')
    data[first_payload:first_payload + 8] = b"\xff\xfe{{{{{{"
    path.write_bytes(bytes(data[:(len(data) // 2) // 512 * 512]))


def _read_before(shards: list[str], seed: int, stream_id: int, num_streams: int, position: dict) -> set[str]:
    """Sample sources a reader had read when it was at ``position`` (replays its stream)."""
    from reolm.train.data import BadSampleCounter, ShardStream, decode_example

    stream = ShardStream(shards, seed, stream_id, num_streams, resample=True, counter=BadSampleCounter(0))
    if position["offset"] == 0 and position["draw"] == 0:
        return set()
    seen = set()
    target = (position["draw"], position["offset"])
    for sample in stream:
        draw, index = (int(part[1:]) for part in sample["__source__"].split("/")[1:])
        if (draw, index + 1) > target:
            break
        example = decode_example(sample, 10**9, BadSampleCounter(0))
        if example is not None:
            seen.add(example.key)
    return seen


@contextlib.contextmanager
def _log_on_error(log: Path):
    """A fixture's error that is not already an assertion carrying the log (a launch timeout, a
    missing file) is raised again with the launcher's log, so every test that depends on the
    fixture shows why the run failed."""
    try:
        yield
    except AssertionError:
        raise
    except Exception as exc:
        tail = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log written)"
        raise AssertionError(f"{type(exc).__name__}: {exc}\nlauncher log ({log}):\n{tail}") from exc


@pytest.fixture(scope="module")
def zero2_run(inputs, tmp_path_factory):
    """ZeRO-2 on 2 ranks (deepspeed launcher) over a corpus with one corrupt train shard, killed
    with SIGKILL once the step-20 checkpoint is complete, then resumed with --resume latest to step
    40.  The one expensive run of the tests below, which each check one thing of its outputs."""
    from reolm.data.corpus import Corpus

    tmp_path = tmp_path_factory.mktemp("zero2_run")
    corpus = tmp_path / "corpus"  # a copy with one corrupt train shard
    shutil.copytree(inputs["corpus"], corpus)
    shards = Corpus.open(corpus).shards("train")
    _corrupt(Path(shards[1]))
    run_dir = tmp_path / "run"
    log = tmp_path / "log.txt"
    overrides = _base(inputs, run_dir, **{"data.corpus": corpus, "optim.steps": 40,
                                          "ckpt.every": 10, "val.every": 40, "data.record_keys": "true",
                                          "dist.ds_config": "ds_configs/zero2.json"})
    with _log_on_error(log):
        # Run 1: SIGKILL the whole launcher process group once the step-20 checkpoint is complete.
        with open(log, "wb") as out:
            proc = subprocess.Popen(_deepspeed(2, overrides), stdout=out, stderr=subprocess.STDOUT, env=_env(),
                                    cwd=REPO, start_new_session=True)
        marker = run_dir / "checkpoints" / "step-00000020" / "trainer_state.json"
        try:
            deadline = time.time() + LAUNCH_TIMEOUT
            while not marker.exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert marker.exists(), log.read_text()[-4000:]
        first = _metrics(run_dir)
        assert all(r["step"] < 40 for r in first), "run 1 must die before the end"
        consumed_files = sorted((run_dir / "consumed").glob("rank-*.tsv"))
        offsets = {p.name: p.stat().st_size for p in consumed_files}
        # The data-stream state of every rank at step 20 (rotation deletes the folder later).
        stream_states = [json.loads((marker.parent / f"rank-{rank:05d}.json").read_text())["data"]
                         for rank in range(2)]
        # Rows run 1 logged after its step-20 checkpoint are moved aside by the resume (steps stay monotonic).
        run1_rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        lines_before = sum(1 for r in run1_rows if r["step"] <= 20)

        # Run 2: --resume latest picks step 20 and runs to 40.
        _run(_deepspeed(2, overrides + ["--resume", "latest"]), log)
        resumed = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()[lines_before:]]
    return SimpleNamespace(
        tmp_path=tmp_path, run_dir=run_dir, log=log, shards=shards, first=first, run1_rows=run1_rows,
        train2=[r for r in resumed if r["kind"] == "train"], val2=[r for r in resumed if r["kind"] == "val"],
        consumed_files=consumed_files, offsets=offsets, stream_states=stream_states)


def test_zero2_resume_continues_the_step_and_sample_counters(zero2_run):
    train2, run_dir = zero2_run.train2, zero2_run.run_dir
    assert [r["step"] for r in train2] == [25, 30, 35, 40]  # the step counter continues
    all_train = [r["step"] for r in _metrics(run_dir)]
    assert all_train == sorted(set(all_train)), all_train
    assert train2[-1]["samples_seen"] == 40 * 2 * 16


def test_zero2_resume_moves_rows_logged_after_the_checkpoint_aside(zero2_run):
    aside = zero2_run.run_dir / "metrics.after-resume.jsonl"
    late = [r for r in zero2_run.run1_rows if r["step"] > 20]
    moved = [json.loads(line)["step"] for line in aside.read_text().splitlines()] if aside.exists() else []
    assert moved == [r["step"] for r in late]


def test_zero2_resume_continues_the_loss_and_the_run_learns(zero2_run):
    train2 = zero2_run.train2
    loss_at = {r["step"]: r["loss"] for r in zero2_run.first}
    # The loss continues from where it was, far below the start.
    assert train2[0]["loss"] < 0.9 * loss_at[5]
    assert train2[0]["loss"] < 1.15 * loss_at[20]
    assert train2[-1]["loss"] < 0.8 * loss_at[5]  # learned over the whole run


def test_zero2_validation_recall_beats_random_retrieval(zero2_run):
    val2 = zero2_run.val2
    assert val2 and val2[-1]["step"] == 40
    _assert_beats_random(val2[-1])


def test_zero2_corrupt_shard_is_skipped_counted_and_logged(zero2_run):
    rows = zero2_run.first + zero2_run.train2
    assert max(r["skipped_samples"] for r in rows) > 0
    assert max(r.get("skipped_samples_truncated", 0) for r in rows) > 0
    assert "skipping bad sample (truncated)" in zero2_run.log.read_text()


def test_zero2_resume_replays_no_sample_and_skips_at_most_one_shuffle_buffer(zero2_run):
    """Per rank's reader: every sample trained on before the checkpoint had been read by then,
    nothing read by then is trained on again, and what was read but not trained on (lost with the
    shuffle buffer) is at most one buffer."""
    cfg = SimpleNamespace(seed=0, shuffle_buffer=64)
    assert len(zero2_run.consumed_files) == 2
    for rank, path in enumerate(zero2_run.consumed_files):
        state = zero2_run.stream_states[rank]
        num_workers = state["num_workers"]
        offset = zero2_run.offsets[path.name]
        pre = {k for step, k in _consumed(path) if step <= 20}
        post = {k for _, k in _consumed(path, offset)}
        assert all(step > 20 for step, _ in _consumed(path, offset))
        assert sorted(int(s) for s in state["streams"]) == [rank * num_workers + w for w in range(num_workers)]
        for sid, position in state["streams"].items():
            stream_id = int(sid)
            read = _read_before(zero2_run.shards, cfg.seed, stream_id, 2 * num_workers, position)
            mine = {k for k in pre if k.startswith(f"s{stream_id}/")}
            assert mine and {k for k in post if k.startswith(f"s{stream_id}/")}
            assert mine <= read
            assert not (post & read), "samples read before the checkpoint were trained on again"
            assert len(read - mine) <= cfg.shuffle_buffer


@pytest.fixture(scope="module")
def zero2_export(zero2_run) -> Path:
    """``reolm export checkpoint`` of the resumed run's last checkpoint."""
    from reolm.commands import export_checkpoint

    out = zero2_run.tmp_path / "export"
    assert export_checkpoint.run(SimpleNamespace(checkpoint=str(zero2_run.run_dir), out=str(out))) == 0
    return out


def test_zero2_export_reproduces_the_engine_weights_and_outputs(zero2_export, zero2_run, inputs):
    """The consolidated weights are the engine's (ZeRO-2 saves the full module too)."""
    from reolm.model import ReoLM

    exported = ReoLM.from_pretrained(zero2_export).eval()
    module_state = torch.load(zero2_run.run_dir / "checkpoints" / "step-00000040" / "mp_rank_00_model_states.pt",
                              weights_only=True)["module"]
    reference = ReoLM.from_pretrained(zero2_export).eval()
    loaded = reference.load_state_dict(module_state, strict=False)
    assert not loaded.missing_keys  # every weight of the reference is the engine's
    from reolm.data.tables import load_tokenizer

    batch = _probe_batch(exported, load_tokenizer(zero2_export), inputs)
    torch.testing.assert_close(exported(batch).pooled, reference(batch).pooled, rtol=1e-5, atol=1e-6)


def test_zero2_export_carries_the_run_tokenizer(zero2_export, inputs):
    from transformers import AutoTokenizer

    from reolm.data.tables import load_tokenizer

    assert len(load_tokenizer(zero2_export)) == len(AutoTokenizer.from_pretrained(str(inputs["tokenizer"])))


def _probe_batch(model, tokenizer, inputs) -> dict:
    from reolm.data.collate import PackedCollator, SequenceExample
    from reolm.data.corpus import find_token_table
    from reolm.data.tables import ImageFeatureTable

    tokens = find_token_table(inputs["corpus"], tokenizer, model.config.max_attr_tokens)
    images = ImageFeatureTable.empty(len(tokens), model.config.image_feature_dim)
    collator = PackedCollator.from_config(tokens, images, tokenizer, model.config, mlm_probability=0.0)
    return collator([SequenceExample([1, 5, 9], None, 0), SequenceExample([120, 130], None, 1)]).history


# ----------------------------------------------------------------------------- ZeRO-3

def test_zero3_two_ranks_learns_and_export_reproduces_validation(inputs, tmp_path):
    run_dir = tmp_path / "run"
    _run(_deepspeed(2, _base(inputs, run_dir, **{"optim.steps": 30, "val.every": 30, "ckpt.every": 0,
                                                 "dist.ds_config": "ds_configs/zero3.json"})),
         tmp_path / "log.txt")
    train = _metrics(run_dir)
    val = _metrics(run_dir, "val")[-1]
    assert train[-1]["loss"] < 0.85 * train[0]["loss"]
    _assert_beats_random(val)
    run_info = json.loads((run_dir / "run_info.json").read_text())
    assert run_info["backend"] == "gloo" and run_info["world_size"] == 2 and run_info["device"] == "cpu"
    ds_cfg = json.loads((run_dir / "ds_config.json").read_text())
    assert ds_cfg["zero_optimization"]["stage"] == 3 and ds_cfg["data_types"]["grad_accum_dtype"] == "fp32"

    # The exported model, evaluated in this process with the trainer's own validation code,
    # reproduces the run's last validation (same weights, same candidates, same users).
    from reolm.config import load_config
    from reolm.data.collate import PackedCollator
    from reolm.data.tables import load_tokenizer
    from reolm.train.config import PretrainConfig
    from reolm.train.export import export_checkpoint
    from reolm.model import ReoLM
    from reolm.train.data import Readers, open_corpus
    from reolm.train.distributed import DistInfo
    from reolm.train.setup import BatchShape, RankContext, TrainInputs, TrainSetup as _Setup, resolve_tables
    from reolm.train.validation import validate, validation_set as _validation_set

    out = export_checkpoint(run_dir / "checkpoints", tmp_path / "export")
    model, tokenizer = ReoLM.from_pretrained(out).eval(), load_tokenizer(out)
    cfg = load_config(PretrainConfig, run_dir / "config.yaml")
    corpus = open_corpus(cfg.data.corpus)
    tables = resolve_tables(cfg, tokenizer, corpus)
    collator = PackedCollator.from_config(tables.tokens, tables.images, tokenizer, cfg.model, seed=cfg.seed)
    setup = _Setup(cfg=cfg, rank=RankContext(info=DistInfo(), device=torch.device("cpu"), precision="fp32",
                                             readers=Readers(rank=0, world_size=1, workers=0, replicate=False)),
                   inputs=TrainInputs(corpus=corpus, tables=tables, tokenizer=tokenizer, collator=collator),
                   engine=SimpleNamespace(module=model), batch=BatchShape(micro=cfg.optim.micro_batch_size, accum=1))
    again = validate(setup, *_validation_set(setup))
    for key in ("val_recall@10", "val_ndcg@10"):
        assert again[key] == pytest.approx(val[key], abs=1e-6)


# ----------------------------------------------------------------------------- accumulation == ranks

def test_one_rank_two_accumulation_equals_two_nodes_one_step(inputs, tmp_path):
    common = {"optim.steps": 6, "log.every": 1, "val.every": 0, "ckpt.every": 0, "data.num_workers": 0,
              "data.replicate_stream": "true", "loss.negatives": "local", "optim.micro_batch_size": 8,
              "optim.warmup_steps": 2}
    single = tmp_path / "single"
    _run([sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", str(TINY),
          *_base(inputs, single, **common, **{"optim.grad_accum": 2})], tmp_path / "single.txt")

    # Two "nodes" on this machine: two torchrun agents meeting at a c10d rendezvous.
    nodes = tmp_path / "nodes"
    port = _port()
    cmds = [[str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "reolm-test",
             str(REPO / "launch" / "pretrain.py"), "--config", str(TINY),
             *_base(inputs, nodes, **common, **{"optim.grad_accum": 1})] for rank in range(2)]
    logs = [open(tmp_path / f"node{rank}.txt", "wb") for rank in range(2)]
    procs = [subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
             for cmd, log in zip(cmds, logs)]
    try:
        codes = [p.wait(timeout=LAUNCH_TIMEOUT) for p in procs]
    finally:  # a failed test leaves nothing running
        for p in procs:
            _kill_tree(p)
        for log in logs:
            log.close()
    assert codes == [0, 0], (tmp_path / "node0.txt").read_text()[-3000:]
    layout = json.loads((nodes / "run_info.json").read_text())
    assert layout["world_size"] == 2 and layout["nodes"] == 2 and layout["local_world_size"] == 1

    a, b = _metrics(single), _metrics(nodes)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    assert a[-1]["samples_seen"] == b[-1]["samples_seen"] == 6 * 16
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=2e-4, abs=1e-5), (ra, rb)
        assert rb["lr"] == pytest.approx(ra["lr"])
    assert a[-1]["loss"] != pytest.approx(a[0]["loss"], rel=1e-3)  # the trajectory actually moves


# ----------------------------------------------------------------------------- graceful stop

def _torchrun(ranks: int, overrides: list[str]) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc-per-node", str(ranks), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{_port()}", str(REPO / "launch" / "pretrain.py"), "--config", str(TINY),
            *overrides]


# What each launcher's users (and Slurm, torchrun, `kill -TERM -PGID`) send, and whether the
# test also resumes the run.  The runner's own session holds every process of the run.
STOP_CASES = {
    "torchrun agent": (_torchrun, lambda pid: os.kill(pid, signal.SIGTERM), True),
    "deepspeed launcher process group": (_deepspeed, lambda pid: os.killpg(pid, signal.SIGTERM), True),
    "deepspeed runner alone": (_deepspeed, lambda pid: os.kill(pid, signal.SIGTERM), False),
}


@pytest.mark.parametrize("case", list(STOP_CASES))
def test_sigterm_with_data_workers_checkpoints_exits_and_resumes(inputs, tmp_path, case):
    """SIGTERM to the launcher (2 ranks, one DataLoader worker each): the workers ignore it, the
    ranks agree, save a complete checkpoint of the same step and exit 0, every process of the run
    exits, and --resume latest continues from that step."""
    import psutil

    launch, send, resume = STOP_CASES[case]
    run_dir = tmp_path / "run"
    overrides = _base(inputs, run_dir, **{"optim.steps": 1000, "log.every": 1, "val.every": 0, "ckpt.every": 0,
                                          "data.num_workers": 1})
    log = tmp_path / "log.txt"
    with open(log, "wb") as out:
        proc = subprocess.Popen(launch(2, overrides), stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=REPO,
                                start_new_session=True)
    tree: list = []
    try:
        _wait_for_steps(run_dir, 3, proc, log)
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert len([p for p in tree if p.name() == "pt_data_worker"]) == 2, [p.name() for p in tree]
        send(proc.pid)
        proc.wait(timeout=300)
        _, alive = psutil.wait_procs(tree, timeout=120)
        assert not alive, f"orphaned after the launcher exited: {alive}"
    finally:  # a failed test leaves nothing running
        _kill_tree(proc)
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.kill()
    text = log.read_text()
    assert "killed by signal" not in text and "reolm pretrain: error" not in text, text[-3000:]
    assert "stopped after step" in text, text[-3000:]
    first = _metrics(run_dir)
    last_step = first[-1]["step"]
    assert 3 <= last_step < 1000
    tag = f"step-{last_step:08d}"
    ckpt = run_dir / "checkpoints" / tag
    assert (run_dir / "checkpoints" / "latest").read_text() == tag
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == last_step
    assert sorted(p.name for p in ckpt.glob("rank-*")) == ["rank-00000.json", "rank-00000.npz",
                                                           "rank-00001.json", "rank-00001.npz"]
    manifest = json.loads((ckpt / "manifest.json").read_text())  # written last: the save completed
    assert manifest["step"] == last_step and manifest["world_size"] == 2
    from reolm.train.checkpoint_files import verify_checkpoint
    assert verify_checkpoint(ckpt) is None  # every listed file present, sizes and sha256 match
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] == last_step
    if not resume:
        return

    lines_before = len((run_dir / "metrics.jsonl").read_text().splitlines())
    steps = {**dict(o.split("=", 1) for o in overrides), "optim.steps": str(last_step + 2)}
    _run(launch(2, [f"{k}={v}" for k, v in steps.items()] + ["--resume", "latest"]), tmp_path / "resume.txt")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()[lines_before:]]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [last_step + 1, last_step + 2]
    per_step = first[-1]["samples_seen"] // last_step
    assert rows[-1]["samples_seen"] == (last_step + 2) * per_step
    assert "resumed from" in (tmp_path / "resume.txt").read_text()
