"""The paper's recipe run end to end at tiny scale: raw Amazon 2018 files and image URLs in, Table 2 out.

``launch/reproduce.py --config launch/configs/reproduce/tiny.yaml --tiny-inputs`` (the command of
docs/reproduce.md) runs the same stages as paper.yaml: ``reolm prepare amazon`` on raw files in the
published formats, the real ``img2dataset`` (its own virtual environment, .venv-img2dataset, which
``make test`` creates) against the HTTP server on 127.0.0.1 the command starts, where some URLs
answer 404, time out or return bytes that are not an image; shards, tables, pre-training through
``sbatch --wait`` on the suite's local 2-node Slurm cluster when it is up (else the ``deepspeed``
launcher on 2 CPU ranks), export, zero-shot, fine-tunes of Reo-LM with and without pre-training
and the four baselines, the dataset table and Table 2.

The first invocation is killed in the middle of pre-training. On Slurm its job outlives it: the
test suspends the job (else, at this scale, it would finish first), checks that a re-run refuses
to submit a second job beside it, and cancels it with `scancel`, as the refusal says; the ranks
checkpoint on the way out. The second invocation resumes from the newest checkpoint and finishes;
the third skips every stage and changes no file.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from slurm_cluster import missing_reason as slurm_missing

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = REPO / "launch" / "configs" / "reproduce" / "tiny.yaml"
IMG2DATASET = REPO / ".venv-img2dataset" / "bin" / "img2dataset"
MODELS = ["reolm", "reolm-zeroshot", "reolm-nopretrain", "sasrec", "gru4rec", "bert4rec", "pop"]
RUN_TIMEOUT = 600


def _require_img2dataset() -> None:
    reason = None
    if not IMG2DATASET.exists():
        reason = f"{IMG2DATASET.relative_to(REPO)} is missing (`make img2dataset-venv` creates it; `make test` does)"
    else:
        probe = subprocess.run([str(IMG2DATASET), "--help"], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PAGER": "cat"})
        if probe.returncode != 0:
            reason = f"{IMG2DATASET} does not run: {probe.stderr[-500:]}"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)


def _processes_naming(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the process group the recipe leads (its stages and, with deepspeed, the ranks)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


class Recipe:
    """The tiny recipe in a temporary folder, started like a user starts it."""

    def __init__(self, root: Path, launcher: str, cluster=None) -> None:
        self.root, self.launcher, self.cluster = root, launcher, cluster
        self.work, self.raw = root / "work", root / "raw"
        self.pretrain = self.work / "runs" / "pretrain"
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
        if cluster is not None:
            self.env["SLURM_CONF"] = cluster.env["SLURM_CONF"]
        self.overrides = [f"work_dir={self.work}", f"raw_dir={self.raw}", f"backbone={root / 'models' / 'backbone'}",
                          f"vision={root / 'models' / 'vision'}"]
        if launcher == "slurm":
            self.overrides += ["pretrain_launcher=slurm", "nodes=2", "gpus_per_node=1"]

    def argv(self) -> list[str]:
        return [sys.executable, str(REPO / "launch" / "reproduce.py"), "--config", str(TINY), "--tiny-inputs",
                *self.overrides]

    def start(self, log: Path) -> subprocess.Popen:
        return subprocess.Popen(self.argv(), stdout=open(log, "w"), stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.root, start_new_session=True)

    def run(self, log: Path) -> subprocess.CompletedProcess:
        proc = self.start(log)
        try:
            proc.wait(timeout=RUN_TIMEOUT)
        finally:
            _kill_group(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text(errors="replace"), "")

    def train_rows(self) -> list[dict]:
        path = self.pretrain / "metrics.jsonl"
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in rows if r.get("kind") == "train"]

    def slurm_job(self) -> str:
        return json.loads((self.pretrain / "owner.json").read_text())["run_id"].rsplit(":", 1)[-1]


def _checkpoints(recipe: Recipe) -> list[int]:
    """Steps of the complete checkpoints (a save in progress is ``step-N.tmp``)."""
    return sorted(int(p.name.split("-")[1]) for p in (recipe.pretrain / "checkpoints").glob("step-*")
                  if p.name.split("-")[1].isdigit())


def _pretrain_settings() -> tuple[int, int]:
    """(optim.steps, ckpt.every) of the tiny preset's pre-training."""
    from reolm.config import load_config
    from reolm.recipe import load_recipe
    from reolm.train.config import PretrainConfig
    cfg = load_recipe([str(TINY)], [])
    pre = load_config(PretrainConfig, [REPO / cfg.pretrain_config], cfg.pretrain_overrides)
    return pre.optim.steps, pre.ckpt.every


def _kill_mid_pretraining(recipe: Recipe, log: Path) -> int:
    """Start the recipe; once pre-training is past its first checkpoint, kill its process group: SIGKILL on
    Slurm (the ranks are Slurm's, not in the group), SIGTERM with the deepspeed launcher (`kill`: the
    ranks in the group checkpoint and exit, so a SIGKILL's leftovers, e.g. DeepSpeed's /dev/shm
    buffers, are not left on the machine)."""
    proc = recipe.start(log)
    deadline = time.time() + RUN_TIMEOUT
    try:
        while time.time() < deadline:
            assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
            checkpoints = _checkpoints(recipe)
            rows = recipe.train_rows()
            if checkpoints and rows and rows[-1]["step"] > checkpoints[0]:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("pre-training did not reach its first checkpoint:\n"
                                 + log.read_text(errors="replace")[-4000:])
        if recipe.cluster is not None:
            # Freeze the job where it is (SIGSTOP through Slurm): the killed recipe's job outlives it, and
            # at tiny scale it would otherwise finish before the re-run below looks at it.
            recipe.cluster.run("scontrol", "suspend", recipe.slurm_job())
    finally:
        _kill_group(proc, signal.SIGKILL if recipe.cluster is not None else signal.SIGTERM)
        proc.wait()
    return recipe.train_rows()[-1]["step"]


@pytest.fixture(scope="module")
def launcher(request):
    """Slurm when the suite's local cluster can run here (always under CI), else the deepspeed launcher."""
    if os.environ.get("REOLM_TEST_RECIPE_LAUNCHER") == "deepspeed" and os.environ.get("CI") != "true":
        return "deepspeed", None  # a local run of the other path
    if slurm_missing() is None or os.environ.get("CI") == "true":
        return "slurm", request.getfixturevalue("slurm_cluster")
    return "deepspeed", None


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory, launcher):
    """(recipe, {name: output}, facts): killed mid pre-training, resumed to the end, then run once more."""
    _require_img2dataset()
    kind, cluster = launcher
    recipe = Recipe(tmp_path_factory.mktemp("recipe"), kind, cluster)
    facts: dict = {"launcher": kind}
    start = time.perf_counter()
    facts["killed_after_step"] = _kill_mid_pretraining(recipe, recipe.root / "run1.log")
    if kind == "slurm":
        # The killed recipe's `sbatch --wait` job is still there (suspended): a re-run must not start a
        # second job in the same run directory.
        job = recipe.slurm_job()
        refused = recipe.run(recipe.root / "run1b.log")
        facts["refused"] = (refused.returncode, refused.stdout)
        cluster.run("scancel", job)  # what the refusal tells the user to do
        deadline = time.time() + 300
        while time.time() < deadline and cluster.run("squeue", "-h", "-j", job, "-o", "%T", check=False).strip():
            time.sleep(1)
        facts["cancelled_job"] = job
    else:
        deadline = time.time() + 120  # the ranks of the killed launcher, if any survived, checkpoint and exit
        while time.time() < deadline and _processes_naming(f"run_dir={recipe.pretrain}"):
            time.sleep(0.5)
    facts["checkpoints_before_resume"] = _checkpoints(recipe)
    second = recipe.run(recipe.root / "run2.log")
    assert second.returncode == 0, second.stdout[-6000:]
    facts["wall_s"] = time.perf_counter() - start
    results = recipe.work / "results"
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in recipe.work.rglob("*") if p.is_file()}
    table_json = (results / "table2.json").read_bytes()
    third = recipe.run(recipe.root / "run3.log")
    assert third.returncode == 0, third.stdout[-4000:]
    facts["unchanged"] = before == {p: (p.stat().st_size, p.stat().st_mtime_ns)
                                    for p in recipe.work.rglob("*") if p.is_file()}
    facts["table_json_identical"] = table_json == (results / "table2.json").read_bytes()
    print(f"tiny recipe ({kind}): killed at step {facts['killed_after_step']}, finished "
          f"{facts['wall_s']:.0f} s after the first start")
    return recipe, {"run2": second.stdout, "run3": third.stdout}, facts


# ----------------------------------------------------------------------------- counts from the raw files

def _raw_lines(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _first_url(record: dict) -> str | None:
    for key in ("imageURLHighRes", "imageURL"):
        if record.get(key):
            return record[key][0]
    return None


def expected_row(raw: Path, category: str, user_k: int, require_title: bool) -> dict:
    """The dataset-table row computed from the raw files alone (item k-core off, duplicates kept)."""
    meta = {r["asin"]: r for r in _raw_lines(raw / f"meta_{category}.json.gz")}
    usable = {a for a, r in meta.items() if r.get("title", "").strip() or not require_title}
    sequences: dict[str, list[str]] = defaultdict(list)
    for review in _raw_lines(raw / f"{category}_5.json.gz"):
        if review["asin"] in usable:
            sequences[review["reviewerID"]].append(review["asin"])
    kept = {u: s for u, s in sequences.items() if len(s) >= user_k}
    items = {a for s in kept.values() for a in s}
    urls = {a: _first_url(meta[a]) for a in items}
    failures = {a: u.split("/")[3] for a, u in urls.items() if u and u.split("/")[3] != "img"}
    images = sum(1 for a, u in urls.items() if u and a not in failures)
    inters = sum(len(s) for s in kept.values())
    return {"users": len(kept), "items": len(items), "images": images, "interactions": inters,
            "image_coverage": images / len(items), "avg_seq_len": inters / len(kept), "failures": failures}


def _domains(recipe: Recipe) -> dict[str, tuple[str, Path, int, bool]]:
    """name -> (Amazon category, processed folder, user_k, require_title), from the preset's config."""
    from reolm.recipe import load_recipe
    cfg = load_recipe([str(TINY)], [])
    data = recipe.work / "data"
    out = {c: (c, data / "pretrain" / c, 3, True) for c in cfg.pretrain_categories}
    out[cfg.dev_category] = (cfg.dev_category, data / "heldout" / cfg.dev_category, 3, True)
    out.update({name: (c, data / "downstream" / name, 4, False) for name, c in cfg.downstream.items()})
    return out


# ----------------------------------------------------------------------------- tests

def test_every_stage_ran_and_pretraining_resumed_from_its_checkpoint(recipe_run):
    recipe, logs, facts = recipe_run
    timings = json.loads((recipe.work / "timings.json").read_text())
    from reolm.recipe import load_recipe, recipe_stages
    from reolm.tiny_amazon import tiny_input_stages
    cfg = load_recipe([str(TINY)], recipe.overrides)
    names = [s.name for s in tiny_input_stages(cfg, 1) + recipe_stages(cfg)]
    assert set(timings) == set(names)  # every stage ran (and recorded its time)
    assert any("img2dataset" in n for n in names) and any(n.startswith("pre-train (" + (
        "Slurm" if facts["launcher"] == "slurm" else "deepspeed")) for n in names)
    # Killed mid pre-training: the re-run continued from a checkpoint, not from step 0.
    total, every = _pretrain_settings()
    assert facts["checkpoints_before_resume"], "no checkpoint survived the kill"
    resumed_from = facts["checkpoints_before_resume"][-1]
    assert every <= resumed_from < total
    if facts["launcher"] == "deepspeed":  # SIGTERM: the ranks saved where they stopped
        assert resumed_from >= facts["killed_after_step"]
    if facts["launcher"] == "slurm":
        slurm_logs = sorted(recipe.work.glob("slurm-pretrain-*.out"), key=lambda p: p.stat().st_mtime)
        assert len(slurm_logs) == 2  # the killed recipe's job, and the re-run's
        resumed_log = slurm_logs[-1].read_text(errors="replace")
    else:
        resumed_log = logs["run2"]
    found = re.search(r"resumed from \S*step-(\d+) at step (\d+)", resumed_log)
    assert found and int(found[1]) == int(found[2]) == resumed_from, resumed_log[-3000:]
    steps = [r["step"] for r in recipe.train_rows()]
    assert steps.count(1) == 1, steps  # never restarted from scratch
    first = len(steps) - (total - resumed_from)  # the rows of the resumed run come last
    assert steps[first:] == list(range(resumed_from + 1, total + 1)), steps
    assert steps[:first] == list(range(1, first + 1)) and first >= resumed_from, steps
    assert total in _checkpoints(recipe)
    if facts["launcher"] == "slurm":
        code, text = facts["refused"]
        assert code != 0 and f"pre-training job {facts['cancelled_job']}" in text and "scancel" in text, text[-3000:]
        info = json.loads((recipe.pretrain / "run_info.json").read_text())
        assert info["world_size"] == 2 and info["nodes"] == 2


def test_dataset_table_has_the_papers_columns_and_matches_the_raw_files(recipe_run):
    recipe, _, _ = recipe_run
    table = (recipe.work / "results" / "datasets.md").read_text().splitlines()
    assert table[0] == "| Dataset | #Users | #Items | #Img (Cover./%) | #Inters | Avg.SL |"
    rows = {r["domain"]: r for r in json.loads((recipe.work / "results" / "datasets.json").read_text())}
    domains = _domains(recipe)
    assert set(rows) == set(domains) and len(table) == 2 + len(domains)
    for name, (category, _, user_k, require_title) in domains.items():
        want = expected_row(recipe.raw, category, user_k, require_title)
        got = rows[name]
        assert {k: got[k] for k in ("users", "items", "images", "interactions")} == \
            {k: want[k] for k in ("users", "items", "images", "interactions")}, name
        assert 0 < want["images"] < want["items"]
        line = next(line for line in table if line.startswith(f"| {name} |"))
        assert line == (f"| {name} | {want['users']:,} | {want['items']:,} | {want['images']:,} "
                        f"({100 * want['image_coverage']:.1f}%) | {want['interactions']:,} | "
                        f"{want['avg_seq_len']:.2f} |")
    # `reolm stats --paper-layout` on the recipe's folders prints that table.
    out = subprocess.run([sys.executable, "-m", "reolm", "stats", "--paper-layout",
                          *(str(d[1]) for d in domains.values())], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.splitlines() == table


def test_failed_downloads_are_counted_and_no_item_gets_a_wrong_image(recipe_run):
    from PIL import Image

    from reolm.data.domain import read_domain
    from reolm.tiny_amazon import expected_image_color
    recipe, logs, _ = recipe_run
    kinds = defaultdict(int)
    for name, (category, folder, user_k, require_title) in _domains(recipe).items():
        want = expected_row(recipe.raw, category, user_k, require_title)
        report = json.loads((folder / "domain.json").read_text())["ingest"]["report"]
        # Every URL was tried once; each failure is counted, by img2dataset's reason.
        assert report["read"]["image_urls_tried"] == sum(1 for _ in open(
            recipe.work / "images" / "urls" / f"{name}.txt"))
        assert report["dropped"].get("image_download_failed", 0) == len(want["failures"]), name
        for kind in want["failures"].values():
            kinds[kind] += 1
        domain = read_domain(folder, load_features=False)
        inverse = {i: a for a, i in domain.smap.items()}
        for index in range(domain.num_items):
            asin = inverse[index]
            stored = list((folder / "images").glob(f"{asin}.*"))
            assert bool(domain.has_image[index]) == (asin not in want["failures"] and bool(stored)), asin
            if asin in want["failures"]:
                assert not stored  # a failed download never becomes an image
            for path in stored:  # the item's own picture, not another item's
                pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
                assert np.abs(pixels.mean(axis=(0, 1)) - expected_image_color(asin)).max() < 6, (asin, path)
        features = np.load(folder / "image_features.npy") if (folder / "image_features.npy").exists() else None
        if features is not None:
            assert np.isfinite(features.astype(np.float32)).all()
    assert kinds["404"] and kinds["slow"] and kinds["junk"], dict(kinds)
    examples = " ".join(json.dumps(json.loads((d[1] / "domain.json").read_text())["ingest"]["report"]["examples"])
                        for d in _domains(recipe).values())
    assert "404" in examples and "timed out" in examples and "decoding" in examples.lower()


def test_table2_has_every_row_for_both_downstream_domains(recipe_run):
    recipe, logs, _ = recipe_run
    results = recipe.work / "results"
    assert (results / "table2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads((results / "table2.json").read_text())
    markdown = (results / "table2.md").read_text()
    from reolm.recipe import load_recipe
    cfg = load_recipe([str(TINY)], [])
    for name in cfg.downstream:
        for model in MODELS:
            doc = json.loads((recipe.work / "runs" / name / model / "metrics.json").read_text())
            assert doc["split"] == "test" and doc["domain"] == name and doc["model"] == model
            for metric in ("NDCG@10", "Recall@10", "MRR"):
                value = doc["metrics"][metric]
                assert 0 <= value <= 1
                assert table["values"][name][metric][model] == pytest.approx(value, abs=1e-4)
        assert f"| {name} | N@10 |" in markdown
    header = next(line for line in markdown.splitlines() if line.startswith("| Dataset | Metric |"))
    assert [c.strip() for c in header.strip("|").split("|")][2:] == [
        "Pop", "GRU4Rec", "SASRec", "BERT4Rec", "Reo-LM (zero-shot)", "Reo-LM (no pre-train)", "Reo-LM", "Improv."]
    heldout = json.loads((recipe.work / "runs" / "zeroshot" / f"{cfg.dev_category}.json").read_text())
    assert heldout["domain"] == cfg.dev_category and 0 <= heldout["metrics"]["NDCG@10"] <= 1
    assert markdown in logs["run2"]  # the recipe prints the table at the end


def test_a_second_invocation_skips_every_stage_and_changes_nothing(recipe_run):
    recipe, logs, facts = recipe_run
    stages = [line for line in logs["run3"].splitlines() if line.startswith("[") and "/" in line.split("]")[0]]
    assert stages and all(line.endswith("already done, skipping") for line in stages), stages
    assert facts["unchanged"] and facts["table_json_identical"]
