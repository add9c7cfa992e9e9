"""The paper's recipe (launch/reproduce.py --dry-run), the stage runner and the image URL list."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import webdataset as wds

from reolm.config import load_config
from reolm.data.domain import read_domain
from reolm.model.encoder import training_flops
from reolm.model.hf_checkpoint import BackboneConfig
from reolm.pipeline import Stage, fingerprint, missing_inputs, plan_lines, run_stages, stale_reason
from reolm.recipe import PAPER_DOWNSTREAM, RECFORMER_DEV, RECFORMER_PRETRAIN, RecipeConfig, pretraining_cost
from reolm.train.config import PretrainConfig

from test_amazon import META, REVIEWS, write_gz
from test_images import image_bytes

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "launch" / "configs" / "reproduce" / "paper.yaml"


def dry_run(tmp_path: Path, *overrides: str) -> tuple[int, str]:
    from reolm.cli import main
    backbone, vision = tmp_path / "minilm", tmp_path / "clip"
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["reproduce", "--config", str(PAPER), f"backbone={backbone}", f"vision={vision}",
                     f"raw_dir={tmp_path / 'raw'}", f"work_dir={tmp_path / 'work'}", *overrides, "--dry-run"])
    return code, out.getvalue()


def test_dry_run_prints_every_stage_wired_to_raw_files_only(tmp_path):
    code, text = dry_run(tmp_path)
    assert code == 0
    from reolm.recipe import load_recipe, recipe_stages
    cfg = load_recipe([str(PAPER)], [f"backbone={tmp_path / 'minilm'}", f"vision={tmp_path / 'clip'}",
                                     f"raw_dir={tmp_path / 'raw'}", f"work_dir={tmp_path / 'work'}"])
    stages = recipe_stages(cfg)
    # 8 categories + 6 domains x (text pass, img2dataset, final pass); shard; token table; image features
    # of the corpus and of the 7 evaluated domains; Slurm; export; CDs zero-shot; 6 x (zero-shot + 2 Reo-LM
    # + 4 baselines); dataset table; report.
    assert len(stages) == 14 * 3 + 1 + 1 + 2 + 1 + 1 + 1 + 6 * 7 + 1 + 1
    assert text.count("\n    $ ") == len(stages)
    # Nothing a stage reads is missing except what the user brings: the raw files and the two models.
    raw = {tmp_path / "raw" / f"{c}_5.json.gz" for c in [*RECFORMER_PRETRAIN, RECFORMER_DEV, *PAPER_DOWNSTREAM.values()]}
    raw |= {tmp_path / "raw" / f"meta_{c}.json.gz" for c in [*RECFORMER_PRETRAIN, RECFORMER_DEV,
                                                             *PAPER_DOWNSTREAM.values()]}
    assert set(missing_inputs(stages)) == raw | {tmp_path / "minilm", tmp_path / "clip"}
    for category in RECFORMER_PRETRAIN:  # sharded for pre-training; CDs only evaluated zero-shot
        assert f"data/pretrain/{category}" in text.split("reolm shard", 1)[1].split("\n", 1)[0]
    assert "CDs_and_Vinyl" not in text.split("reolm shard", 1)[1].split("\n", 1)[0]
    assert "sbatch --wait --nodes 2 --gpus-per-node 8 --output " in text
    assert "launch/slurm/pretrain.sbatch --config launch/configs/pretrain/paper.yaml" in text
    assert "--resume latest" in text  # the recipe owns its run directory: a re-run continues it
    for name in PAPER_DOWNSTREAM:
        assert f"runs/{name}/reolm/metrics.json" in text and f"runs/{name}/bert4rec" in text
        assert f"runs/{name}/reolm-zeroshot/metrics.json" in text
    assert "--write-image-urls" in text and "img2dataset --url_list" in text and "--image-shards" in text


def test_dry_run_states_gpu_hours_from_the_flops_counter(tmp_path):
    _, text = dry_run(tmp_path, "nodes=4")
    note = next(line for line in text.splitlines() if "GPU-hours" in line)
    cfg = load_config(RecipeConfig, [PAPER], [f"backbone={tmp_path}", "nodes=4"])
    cost = pretraining_cost(cfg)
    assert f"~{int(-(-cost['gpu_hours'] // 1))} GPU-hours" in note and "4 x 8 GPUs" in note
    # The estimate is the FLOPs counter applied to the stated sequence shape, times steps x batch.
    pre = load_config(PretrainConfig, [REPO / "launch/configs/pretrain/paper.yaml"])
    paper_backbone = BackboneConfig(model_type="roberta", vocab_size=50265, hidden_size=384, num_hidden_layers=12,
                                    num_attention_heads=12, intermediate_size=1536)
    history, target = 1 + (9.3 - 3) * 40, 41
    per_seq = training_flops(paper_backbone, pre.model, int(history + target), int(history ** 2 + target ** 2),
                             int(0.15 * history))
    assert cost["flops"] == pytest.approx(per_seq * 2048 * 35240)
    doubled = pretraining_cost(load_config(RecipeConfig, [PAPER], [f"backbone={tmp_path}", "nodes=4",
                                                                   "pretrain_overrides=[optim.steps=70480]"]))
    assert doubled["gpu_hours"] == pytest.approx(2 * cost["gpu_hours"])
    assert cost["wall_hours"] == pytest.approx(cost["gpu_hours"] / 32)


def test_text_only_recipe_has_no_image_stages(tmp_path):
    code, text = dry_run(tmp_path, "vision=", "downstream={Scientific: Industrial_and_Scientific}",
                         "baselines=[pop]", "no_pretrain_ablation=false")
    assert code == 0 and "img2dataset" not in text and "tables images" not in text
    assert text.count("launch/finetune.py") == 2  # Reo-LM + pop on the one domain
    assert "reolm stats" in text and "--paper-layout" in text


def test_stage_runner_skips_done_stages_and_records_time_and_memory(tmp_path):
    marker = tmp_path / "a.txt"
    py = sys.executable
    # "write a" sleeps (wall time, almost no CPU); "grow memory" also spins for 0.8 s of CPU time.
    stages = [Stage("write a", [py, "-c", f"import time; time.sleep(0.8); open({str(marker)!r}, 'w').write('x' * 10)"],
                    marker),
              Stage("grow memory", [py, "-c", "import time\nb = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096])\n"
                                              "while time.process_time() < 0.8: pass\n"
                                              f"open({str(tmp_path / 'b.txt')!r}, 'w')"], tmp_path / "b.txt",
                    inputs=[marker])]
    # Run the stages from a small process: a child's peak RSS is never below its parent's (fork, then exec).
    runner = ("import json, pickle, sys; from pathlib import Path; from reolm.pipeline import run_stages; "
              "print(json.dumps(run_stages(Path(sys.argv[1]), pickle.loads(bytes.fromhex(sys.argv[2])), 'rerun')))")
    import pickle

    def run(stage_list: list[Stage]) -> subprocess.CompletedProcess:
        return subprocess.run([py, "-c", runner, str(tmp_path / "run"), pickle.dumps(stage_list).hex()],
                              capture_output=True, text=True, cwd=REPO)
    result = run(stages)
    assert result.returncode == 0, result.stderr
    timings = json.loads(result.stdout.splitlines()[-1])
    assert set(timings) == {"write a", "grow memory"}
    assert timings["grow memory"]["peak_rss_gib"] > 0.19 > 0.1 > timings["write a"]["peak_rss_gib"]
    assert timings["grow memory"]["cpu_s"] >= 0.8 > 0.5 > timings["write a"]["cpu_s"]  # CPU, not wall, time
    assert timings["write a"]["wall_s"] >= 0.8
    assert json.loads((tmp_path / "run" / "timings.json").read_text()) == timings
    marker.write_text("kept")  # a done stage is not run again
    assert run(stages).returncode == 0 and marker.read_text() == "kept"
    assert "    input  " + str(marker) + "  (from [1] write a)" in plan_lines(stages)
    failing = [Stage("fail", [py, "-c", "raise SystemExit(3)"], tmp_path / "never")]
    with pytest.raises(SystemExit, match="exit code 3; rerun"):
        run_stages(tmp_path / "run", failing, resume_hint="rerun")


def test_a_refreshed_summary_reruns_only_when_an_input_file_is_newer(tmp_path):
    """A report stage (refresh=True) over run folders: a row added to a finished run makes the next
    invocation rewrite the report; an ordinary stage with the same inputs stays done."""
    import os
    rows = [tmp_path / f"run{i}" / "metrics.json" for i in range(2)]
    for row in rows[:1]:
        row.parent.mkdir()
        row.write_text("1")
    report, plain = tmp_path / "report.txt", tmp_path / "plain.txt"
    count = ("import sys, glob; open(sys.argv[1], 'w').write(str(len(glob.glob(sys.argv[2]))))")

    def stages() -> list[Stage]:
        existing = [r for r in rows if r.exists()]
        return [Stage("report", [sys.executable, "-c", count, str(report), str(tmp_path / "run*" / "metrics.json")],
                      report, inputs=existing, refresh=True),
                Stage("plain", [sys.executable, "-c", count, str(plain), str(tmp_path / "run*" / "metrics.json")],
                      plain, inputs=existing)]
    run_stages(tmp_path / "run", stages(), resume_hint="rerun")
    assert report.read_text() == plain.read_text() == "1"
    run_stages(tmp_path / "run", stages(), resume_hint="rerun")  # nothing new: both stay done
    assert all(s.is_done() for s in stages())
    rows[1].parent.mkdir()
    rows[1].write_text("1")
    made = os.path.getmtime(report)
    os.utime(rows[1], (made + 5, made + 5))  # written after the report (mtime resolution aside)
    assert [s.is_done() for s in stages()] == [False, True]
    assert any(line.endswith("exists and is newer than its input files") for line in plan_lines(stages()))
    run_stages(tmp_path / "run", stages(), resume_hint="rerun")
    assert report.read_text() == "2" and plain.read_text() == "1"


def test_a_finished_stage_whose_config_or_input_changed_is_stale_and_stops_the_pipeline(tmp_path):
    """A stage run with other settings (fingerprint) or after its input was remade is never taken
    as done silently: the runner stops and names the output to move aside; nothing is deleted."""
    run_dir = tmp_path / "run"
    data, model, report = tmp_path / "data.txt", tmp_path / "model" / "metrics.json", tmp_path / "report.txt"
    write = "import sys, pathlib; p = pathlib.Path(sys.argv[1]); p.parent.mkdir(exist_ok=True); p.write_text(sys.argv[2])"

    def stages(setting: str) -> list[Stage]:
        return [Stage("data", [sys.executable, "-c", write, str(data), "d"], data),
                Stage("train", [sys.executable, "-c", write, str(model), setting], model, inputs=[data],
                      fingerprint=fingerprint("train", {"patience": setting})),
                Stage("report", [sys.executable, "-c", write, str(report), setting], report, inputs=[model],
                      refresh=True)]
    run_stages(run_dir, stages("1"), resume_hint="rerun")
    assert model.read_text() == "1"
    run_stages(run_dir, stages("1"), resume_hint="rerun")  # same settings: all done, nothing stale
    assert [stale_reason(stages("1"), i, json.loads((run_dir / "stages.json").read_text())) for i in range(3)] == [""] * 3

    with pytest.raises(SystemExit, match=r"'train' finished but is stale: its configuration changed.*model/metrics.json"):
        run_stages(run_dir, stages("5"), resume_hint="rerun")
    assert model.read_text() == "1"  # the old result is kept for the user to move aside
    assert "[2/3] train (done but STALE: its configuration changed since it ran)" in plan_lines(stages("5"), run_dir)
    model.rename(model.with_suffix(".old"))
    run_stages(run_dir, stages("5"), resume_hint="rerun")
    assert model.read_text() == "5" and report.read_text() == "5"  # the report refreshed as well

    data.unlink()  # the data remade: the model trained on the old data is stale
    run_stages(run_dir, stages("5")[:1], resume_hint="rerun")
    assert "was remade by [1] data after it ran" in stale_reason(
        stages("5"), 1, json.loads((run_dir / "stages.json").read_text()))
    with pytest.raises(SystemExit, match="'train' finished but is stale: its input .*data.txt was remade"):
        run_stages(run_dir, stages("5"), resume_hint="rerun")

    # A stage finished before the record was kept (no entry) is taken as it is.
    state = json.loads((run_dir / "stages.json").read_text())
    del state["train"]
    (run_dir / "stages.json").write_text(json.dumps(state))
    run_stages(run_dir, stages("9"), resume_hint="rerun")
    assert model.read_text() == "5"
    (run_dir / "stages.json").write_text("[1, 2")
    with pytest.raises(SystemExit, match="stages.json: malformed JSON.*move it aside"):
        run_stages(run_dir, stages("9"), resume_hint="rerun")


def test_transfer_fingerprints_follow_only_the_config_sections_a_model_reads(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    from real_transfer import _finetune_stage

    config = tmp_path / "ft.yaml"

    def prints(reolm_patience: int, sasrec_layers: int) -> tuple[str, str]:
        config.write_text(f"train: {{epochs: 3}}\neval: {{metric: NDCG@10}}\nreolm: {{stage1: {{patience: {reolm_patience}}}}}\n"
                          f"sasrec: {{num_layers: {sasrec_layers}}}\n")
        return tuple(_finetune_stage("x", tmp_path, config, model, tmp_path / model, ["--backbone", str(tmp_path / m)],
                                     ["eval.max_users=0"], []).fingerprint
                     for model, m in (("reolm", "a"), ("sasrec", "b")))
    reolm, sasrec = prints(1, 2)
    assert prints(5, 2) == (prints(5, 2)[0], sasrec) and prints(5, 2)[0] != reolm
    assert prints(1, 3)[0] == reolm and prints(1, 3)[1] != sasrec
    # A path in the arguments does not enter it (a moved run directory keeps its finished stages).
    moved = _finetune_stage("x", tmp_path, config, "reolm", tmp_path / "r", ["--backbone", "/elsewhere"],
                            ["eval.max_users=0"], [])
    assert moved.fingerprint == prints(1, 3)[0]
    # An override counts only for the models whose section it sets (eval: every model).
    def with_overrides(model: str, overrides: list[str]) -> str:
        return _finetune_stage("x", tmp_path, config, model, tmp_path / "r", [], overrides, []).fingerprint
    assert with_overrides("sasrec", ["reolm.stage1.epochs=3"]) == with_overrides("sasrec", [])
    assert with_overrides("reolm", ["reolm.stage1.epochs=3"]) != with_overrides("reolm", [])
    assert with_overrides("sasrec", ["eval.max_users=9"]) != with_overrides("sasrec", [])


def test_demo_plan_reads_only_what_earlier_stages_make_and_reports_every_run(tmp_path):
    from reolm.demo import demo_stages, settings

    stages = demo_stages(tmp_path / "demo")
    assert missing_inputs(stages) == {}  # e.g. the text-initialised SASRec after the Reo-LM it reads
    names = [s.name for s in stages]
    for (domain, runs), prefix in zip(settings(tmp_path / "demo").values(), ("", "cold items: ")):
        text_init = stages[names.index(prefix + "SASRec, item rows from Reo-LM's item vectors")]
        assert text_init.inputs == [domain, runs / "reolm" / "metrics.json"]
        assert text_init.argv[text_init.argv.index("--item-init") + 1] == str(runs / "reolm")
        assert names.index(prefix + "fine-tune Reo-LM") < names.index(text_init.name)
    runs = [s for s in stages if s.done_marker.name == "metrics.json"]
    assert len(runs) == 6 + 5  # the cold-item split has no run from the raw backbone
    report = stages[-1]
    assert report.refresh and report.inputs == [s.done_marker for s in runs]
    reported = report.argv[report.argv.index("report") + 1:report.argv.index("--out")]
    assert reported == [str(s.done_marker.parent) for s in runs]


def test_prepare_writes_image_urls_that_join_back(tmp_path):
    reviews = write_gz(tmp_path / "r.json.gz", REVIEWS)
    meta = write_gz(tmp_path / "m.json.gz", META)
    urls, text_dir = tmp_path / "urls.txt", tmp_path / "text"
    common = [sys.executable, "-m", "reolm", "prepare", "amazon", "--reviews", str(reviews), "--meta", str(meta),
              "--name", "Toys", "--user-k", "3", "--item-k", "0"]
    result = subprocess.run([*common, "--out", str(text_dir), "--write-image-urls", str(urls)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # One URL per kept item that has one (I3 has none; I6, I7, I9 are not kept), in item order.
    assert urls.read_text().splitlines() == ["https://img/I1.jpg", "https://img/I2.jpg", "https://img/I4.jpg",
                                             "https://img/I5.jpg"]
    shard_dir = tmp_path / "img2dataset"
    shard_dir.mkdir()
    with wds.TarWriter(str(shard_dir / "00000.tar")) as sink:  # what img2dataset writes for that list
        for k, url in enumerate(urls.read_text().splitlines()[:2]):
            sink.write({"__key__": f"{k:09d}", "jpg": image_bytes((64, 64)), "json": {"url": url}})
    # img2dataset's account of the shard: the other two URLs failed (they wrote no sample).
    (shard_dir / "00000_stats.json").write_text(json.dumps({
        "count": 4, "successes": 2, "failed_to_download": 2, "failed_to_resize": 0,
        "status_dict": {"success": 2, "HTTP Error 404: Not Found": 1, "timed out": 1}}))
    final = tmp_path / "Toys"
    result = subprocess.run([*common, "--out", str(final), "--image-shards", str(shard_dir / "*.tar")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert read_domain(final).has_image.tolist() == [True, True, False, False, False]
    assert read_domain(final).smap == read_domain(text_dir).smap
    report = json.loads((final / "domain.json").read_text())["ingest"]["report"]
    assert report["read"]["image_urls_tried"] == 4 and report["dropped"]["image_download_failed"] == 2
    assert sorted(report["examples"]["image_download_failed"]) == ["HTTP Error 404: Not Found x1", "timed out x1"]


TINY = REPO / "launch" / "configs" / "reproduce" / "tiny.yaml"


def test_tiny_preset_is_the_same_recipe_with_every_input_made_by_a_stage(tmp_path):
    from reolm.config import ConfigError
    from reolm.recipe import load_recipe, recipe_stages
    from reolm.tiny_amazon import tiny_input_stages
    paths = [f"work_dir={tmp_path / 'work'}", f"raw_dir={tmp_path / 'raw'}", f"backbone={tmp_path / 'bb'}",
             f"vision={tmp_path / 'vit'}"]
    cfg = load_recipe([str(TINY)], paths)
    # A config file's mapping replaces the default one (not merged into the paper's six domains).
    assert list(cfg.downstream) == ["Scientific", "Instruments"]
    stages = recipe_stages(cfg)
    paper = recipe_stages(load_recipe([str(PAPER)], paths))
    # The same kinds of stages as the paper's recipe, fewer categories and domains.
    kinds = lambda ss: {s.name.split(":")[-1].split(" (")[0].split(" ")[0] for s in ss}  # noqa: E731
    assert kinds(stages) == kinds(paper)
    assert missing_inputs(tiny_input_stages(cfg, 12345) + stages) == {}
    assert [s.name for s in stages if s.name.startswith("pre-train")] == ["pre-train (deepspeed launcher)"]
    slurm = recipe_stages(load_recipe([str(TINY)], paths + ["pretrain_launcher=slurm", "nodes=2", "gpus_per_node=1"]))
    (pre,) = [s for s in slurm if s.name.startswith("pre-train")]
    assert pre.argv[:7] == ["sbatch", "--wait", "--nodes", "2", "--gpus-per-node", "0", "--output"]
    assert pre.env["GPUS_PER_NODE"] == "1" and pre.argv[-2:] == ["--resume", "latest"]
    assert stages[[s.name for s in stages].index("download images of Automotive (img2dataset)")].argv[0] == \
        str(REPO / ".venv-img2dataset" / "bin" / "img2dataset")
    with pytest.raises(ConfigError, match="deepspeed launcher runs on this machine only"):
        load_recipe([str(TINY)], ["nodes=2"])
