"""bench/gpu_acceptance.sh is ready for a bare GPU box (CPU checks; the real run needs a GPU): its
dry run lists every step within the 420 s budget and writes nothing; its plumbing records a
failed or timed-out step and goes on, leaving every step's files and the summary in the output
folder; the benchmarks write where they are told, after each measurement; the wheelhouse holds
what the image lacks; the environment record says which torch the figures are for."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_acceptance.sh"
sys.path.insert(0, str(REPO / "bench"))

STEPS = ["install", "environment", "fused-kernel", "cuda-tests", "finetune-e2e", "pretrain-resume", "throughput",
         "pretrain-bench", "finetune-bench", "ranking-1M-items"]


def _dry_run(out: Path) -> tuple[dict[str, int], dict[str, str], str]:
    text = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True, text=True,
                          timeout=60, check=True).stdout
    steps = [line.split(maxsplit=2) for line in text.splitlines() if line.startswith("  ")]
    return {s[0]: int(s[1].rstrip("s")) for s in steps}, {s[0]: s[2] for s in steps}, text


def test_dry_run_lists_every_step_within_the_budget_and_writes_nothing(tmp_path):
    out = tmp_path / "results"
    limits, commands, text = _dry_run(out)
    assert list(limits) == STEPS
    grace = int(re.search(r"\+ (\d+) s grace per step", text).group(1))
    assert sum(limits.values()) + grace * len(limits) <= 420
    assert f"writing into {out}" in text and not out.exists()
    assert "--no-index --find-links .whl deepspeed webdataset" in commands["install"]
    assert "-m gpu" in commands["cuda-tests"] and "tests/test_collate.py" in commands["cuda-tests"]
    assert "REOLM_REQUIRE_FUSED=1" in commands["fused-kernel"]
    for step in ("fused-kernel", "finetune-e2e", "pretrain-resume"):  # a skipped test fails these steps
        assert re.search(r"--junitxml (\S+) && none_skipped \1$", commands[step]), commands[step]
    for script in ("bench/gpu_env.py", "bench/throughput.py", "bench/pretrain_gpu.py", "bench/finetune_gpu.py",
                   "bench/ranking.py"):
        step = next(name for name, c in commands.items() if script in c)
        assert '--out "$RESULTS_DIR"/' in commands[step], step  # into the results folder, not bench/results
        assert (REPO / script).is_file(), script
    for test in ("test_finetune_launch_end_to_end_on_cuda", "test_one_gpu_deepspeed_pretraining_stops_on_sigterm",
                 "test_fp32_training_on_cuda_follows_the_cpu_loss_curve", "fused_attention_kernel"):
        assert any(test in c for c in commands.values()), test


def test_a_failed_and_a_timed_out_step_are_recorded_and_the_run_goes_on(tmp_path):
    steps = tmp_path / "steps.txt"
    steps.write_text('# name|limit|command\n'
                     'first|20|echo measured; printf \'{"a": 1}\' > "$RESULTS_DIR/first_gpu.json"\n'
                     'broken|20|echo failing on purpose; exit 3\n'
                     '\n'
                     'slow|1|sleep 30\n'
                     'last|20|printf \'{"b": 2}\' > "$RESULTS_DIR/last_gpu.json"\n')
    out = tmp_path / "results"  # given relative to the caller's folder, not the repository
    proc = subprocess.run(["bash", str(SCRIPT), "--steps", "steps.txt", "--out", "results"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "first_gpu.json").read_text()) == {"a": 1}
    assert json.loads((out / "last_gpu.json").read_text()) == {"b": 2}
    summary = json.loads((out / "gpu_acceptance_gpu.json").read_text())
    assert summary["complete"] is True and summary["failed"] == 2 and summary["budget_s"] == 420
    status = {s["step"]: (s["status"], s["rc"]) for s in summary["steps"]}
    assert status == {"first": ("passed", 0), "broken": ("failed", 3), "slow": ("timed-out", 124),
                      "last": ("passed", 0)}
    for step in summary["steps"]:
        assert json.loads((out / f"{step['step']}_step_gpu.json").read_text()) == step
    assert (out / "first_gpu.log").read_text() == "measured\n"
    assert "failing on purpose" in (out / "broken_gpu.log").read_text()
    assert "broken: failed (rc=3)" in proc.stdout


def test_a_skipped_test_fails_its_step(tmp_path):
    """What a CPU machine shows of the fused-kernel step: its one test skips, so the step fails."""
    _, commands, _ = _dry_run(tmp_path)
    (tmp_path / "steps.txt").write_text("fused-kernel|60|" + commands["fused-kernel"].replace("python3", sys.executable))
    subprocess.run(["bash", str(SCRIPT), "--steps", "steps.txt", "--out", "results"], cwd=tmp_path, timeout=120,
                   check=True, capture_output=True)
    (step,) = json.loads((tmp_path / "results" / "gpu_acceptance_gpu.json").read_text())["steps"]
    skipped = not torch.cuda.is_available()
    assert (step["status"], step["rc"]) == (("failed", 1) if skipped else ("passed", 0))
    assert f'skipped="{int(skipped)}"' in (tmp_path / "results" / "fused_kernel_gpu.xml").read_text()


def test_benchmark_results_go_where_told_and_are_rewritten_as_they_grow(tmp_path):
    from common import RESULTS, PartialResult, result_path

    assert result_path("ranking_gpu.json") == RESULTS / "ranking_gpu.json"
    assert result_path(tmp_path / "x_gpu.json") == tmp_path / "x_gpu.json"
    assert result_path("bench/results/ranking_gpu.json") == Path("bench/results/ranking_gpu.json")  # not nested
    partial = PartialResult(tmp_path / "new" / "bench_gpu.json", benchmark="b", rows=[])
    partial.update(rows=[1])
    assert json.loads((tmp_path / "new" / "bench_gpu.json").read_text()) == {"benchmark": "b", "rows": [1],
                                                                            "complete": False}
    partial.finish(rows=[1, 2])
    assert json.loads((tmp_path / "new" / "bench_gpu.json").read_text())["complete"] is True


def test_pretrain_benchmark_reports_a_run_stopped_before_two_windows(tmp_path):
    from pretrain_gpu import progress

    assert progress(tmp_path) == {"train_windows": 0}
    row = json.dumps({"step": 20, "kind": "train", "time": 1.0, "loss": 3.0})
    (tmp_path / "metrics.jsonl").write_text(row + "\n")
    assert progress(tmp_path) == {"train_windows": 1}
    (tmp_path / "metrics.jsonl").write_text(row + "\n" + row[:15])  # the run is writing its next line
    assert progress(tmp_path) == {"train_windows": 1}


def test_environment_record_names_the_torch_the_figures_are_for(tmp_path):
    out = tmp_path / "environment_gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_env.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    info = json.loads(out.read_text())  # written even though this machine has no GPU
    makefile = (REPO / "Makefile").read_text()
    assert info["torch_pinned"] == re.search(r"TORCH_SPEC \?= torch==(\S+)", makefile).group(1)
    assert info["torch"].split("+")[0] == info["torch_pinned"] and info["torch_matches_pin"] is True
    assert info["deepspeed"][0].isdigit()
    if not info["cuda_available"]:
        assert proc.returncode == 1 and "no CUDA device" in proc.stderr
    # The Makefile's GPU branch installs the same pinned torch as its CPU branch.
    assert makefile.count('pip install -q "$(TORCH_SPEC)"') == 2 and "pip install -q torch\n" not in makefile


def _requirement_closure(roots: list[str], present: set[str]) -> set[str]:
    """Distributions ``roots`` need in this environment (markers evaluated here), names normalised;
    a ``present`` one comes with its own dependencies (the image's torch brings sympy etc.)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for spec in [] if name in present else md.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def test_wheelhouse_holds_everything_the_image_lacks():
    from packaging.utils import canonicalize_name

    text = subprocess.run(["bash", str(REPO / "bench" / "build_wheelhouse.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=120, check=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
                          ).stdout
    lines = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    image = {canonicalize_name(n) for n in lines["image has"].split()}
    fetched = {canonicalize_name(spec.split("==")[0]) for key, value in lines.items() if key.startswith("would")
               for spec in value.split()}
    _, commands, _ = _dry_run(Path("/nonexistent"))
    installed = commands["install"].split("--find-links .whl ", 1)[1].split()
    assert {canonicalize_name(n) for n in installed} <= fetched
    missing = _requirement_closure(installed, image) - image - fetched
    assert not missing, f"the GPU image lacks {sorted(missing)} and the wheelhouse does not fetch them"
    assert "torch" in image and not fetched & image


@pytest.mark.parametrize("script", ["gpu_acceptance.sh", "build_wheelhouse.sh"])
def test_scripts_refuse_unknown_arguments(script):
    proc = subprocess.run(["bash", str(REPO / "bench" / script), "--bogus"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "unknown argument --bogus" in proc.stderr
