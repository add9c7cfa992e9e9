"""Results table (the paper's Table 2 layout) and plots from run directories.

Rows are datasets x {N@10, R@10, MRR}, columns are models; the best value of each row is
bold; ``Improv.`` is the relative gain of Reo-LM (``reolm``) over the best *baseline*
(pop, GRU4Rec, SASRec, BERT4Rec; Reo-LM ablations are not baselines).

Runs are grouped by their ``setting`` (``warm``, or the domain's split such as
``cold-items``, see :mod:`reolm.data.splits`): one table per setting, then each setting's
metrics by target-item training frequency (``by_item_frequency``), and one sentence per
setting saying which model wins (:func:`format_report`, :func:`report_json`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from reolm.eval.contract import MODEL_NAMES, read_metrics
from reolm.io import atomic_path

__all__ = ["TABLE_METRICS", "MODEL_ORDER", "BASELINE_MODELS", "MODEL_LABELS", "ResultsTable", "load_runs",
           "build_table", "format_markdown", "plot_bars", "plot_curves", "read_log", "group_by_setting",
           "bucket_values", "format_buckets", "winner_sentences", "format_report", "report_json"]

TABLE_METRICS: dict[str, str] = {"NDCG@10": "N@10", "Recall@10": "R@10", "MRR": "MRR"}
MODEL_ORDER = ("pop", "gru4rec", "sasrec", "bert4rec", "sasrec-textinit", "plm-zeroshot", "reolm-zeroshot",
               "reolm-nopretrain", "reolm", "reolm-nopretrain-id", "reolm-id")
# The ID baselines "Improv." compares Reo-LM with (sasrec-textinit reads item text, so it is not one).
BASELINE_MODELS = frozenset({"pop", "gru4rec", "sasrec", "bert4rec"})
MODEL_LABELS = {"pop": "Pop", "gru4rec": "GRU4Rec", "sasrec": "SASRec", "bert4rec": "BERT4Rec",
                "sasrec-textinit": "SASRec (text init)",
                "plm-zeroshot": "PLM (zero-shot)", "reolm-zeroshot": "Reo-LM (zero-shot)", "reolm-nopretrain": "Reo-LM (no pre-train)",
                "reolm": "Reo-LM", "reolm-nopretrain-id": "Reo-LM + ID (no pre-train)",
                "reolm-id": "Reo-LM + ID"}
assert set(MODEL_ORDER) == set(MODEL_NAMES)
DECIMALS = 4


@dataclass
class ResultsTable:
    domains: list[str]
    models: list[str]
    metrics: list[str]
    values: dict[str, dict[str, dict[str, float]]]          # domain -> metric -> model -> value
    best: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    improvement: dict[str, dict[str, float | None]] = field(default_factory=dict)   # percent
    runs: list[str] = field(default_factory=list)
    users: dict[str, int] = field(default_factory=dict)     # domain -> evaluated (test) users
    items: dict[str, int] = field(default_factory=dict)     # domain -> items ranked

    def to_json(self) -> dict[str, Any]:
        return {"domains": self.domains, "models": self.models, "metrics": self.metrics, "values": self.values,
                "best": self.best, "improvement_pct": self.improvement, "runs": self.runs}


def load_runs(run_dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Validated metrics.json of each run (a run dir or the metrics file itself), with ``run_dir`` added."""
    docs = []
    for run in run_dirs:
        path = Path(run)
        path = path / "metrics.json" if path.is_dir() else path
        doc = read_metrics(path, run=False)  # launch/evaluate.py documents (zero-shot rows) have no best_val
        if doc["split"] != "test":
            raise ValueError(f"{path}: a {doc['split']!r} document; the results table compares test metrics")
        doc["run_dir"] = str(path.parent)
        docs.append(doc)
    if not docs:
        raise ValueError("no run directories given")
    return docs


def build_table(docs: Sequence[dict[str, Any]], metrics: Sequence[str] = tuple(TABLE_METRICS)) -> ResultsTable:
    """Arrange runs by (domain, model); two runs of the same pair are an error."""
    seen: dict[tuple[str, str], str] = {}
    values: dict[str, dict[str, dict[str, float]]] = {}
    domains: list[str] = []
    for doc in docs:
        key = (doc["domain"], doc["model"])
        if key in seen:
            raise ValueError(f"two runs of model {key[1]!r} on domain {key[0]!r}: {seen[key]} and "
                             f"{doc.get('run_dir', '?')}; pass one of them")
        seen[key] = doc.get("run_dir", "?")
        if doc["domain"] not in values:
            domains.append(doc["domain"])
            values[doc["domain"]] = {m: {} for m in metrics}
        for metric in metrics:
            if metric not in doc["metrics"]:
                raise ValueError(f"{doc.get('run_dir', '?')}: metrics.json lacks {metric}")
            values[doc["domain"]][metric][doc["model"]] = float(doc["metrics"][metric])
    present = {model for _, model in seen}
    models = [m for m in MODEL_ORDER if m in present]
    users = {d: max(int(doc["num_users"]) for doc in docs if doc["domain"] == d) for d in domains}
    items = {doc["domain"]: int(doc["num_items"]) for doc in docs}
    table = ResultsTable(domains, models, list(metrics), values, runs=[d.get("run_dir", "?") for d in docs],
                         users=users, items=items)
    for domain in domains:
        table.best[domain], table.improvement[domain] = {}, {}
        for metric in metrics:
            row = values[domain][metric]
            # Compare at the printed precision so that bold marks what the reader sees as best.
            top = max(round(v, DECIMALS) for v in row.values())
            table.best[domain][metric] = [m for m in models if m in row and round(row[m], DECIMALS) == top]
            table.improvement[domain][metric] = _improvement(row)
    return table


def _improvement(row: dict[str, float]) -> float | None:
    """Percent gain of reolm over the best baseline in ``row`` (None when either is absent)."""
    baselines = [v for m, v in row.items() if m in BASELINE_MODELS]
    if "reolm" not in row or not baselines or max(baselines) <= 0:
        return None
    return 100.0 * (row["reolm"] / max(baselines) - 1.0)


def format_markdown(table: ResultsTable) -> str:
    header = ["Dataset", "Metric"] + [MODEL_LABELS[m] for m in table.models] + ["Improv."]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(table.models) + 1)]
    for domain in table.domains:
        for i, metric in enumerate(table.metrics):
            row = table.values[domain][metric]
            cells = [domain if i == 0 else "", TABLE_METRICS.get(metric, metric)]
            for model in table.models:
                if model not in row:
                    cells.append("–")
                    continue
                text = f"{row[model]:.{DECIMALS}f}"
                cells.append(f"**{text}**" if model in table.best[domain][metric] else text)
            gain = table.improvement[domain][metric]
            cells.append("–" if gain is None else f"{gain:+.2f}%")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- settings and buckets

SETTING_LABELS = {"warm": "Warm (the domain as given)", "cold-items": "Cold items (reolm split cold-items)",
                  "few-shot": "Few-shot users (reolm split few-shot)"}


def _setting_label(setting: str) -> str:
    return SETTING_LABELS.get(setting, f"Setting {setting}")


def group_by_setting(docs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs by ``setting`` (documents without one are ``warm``), warm first, others as met."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for doc in sorted(docs, key=lambda d: d.get("setting", "warm") != "warm"):
        groups.setdefault(doc.get("setting", "warm"), []).append(doc)
    return groups


def bucket_values(docs: Sequence[dict[str, Any]], metrics: Sequence[str] = tuple(TABLE_METRICS)
                  ) -> dict[str, list[dict[str, Any]]]:
    """domain -> buckets in order, each ``{bucket, min, max, users: {model: n}, values: {metric: {model: v}}}``
    (from the runs' ``by_item_frequency``; runs without it are left out)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for doc in docs:
        for bucket in doc.get("by_item_frequency") or []:
            row = out.setdefault(doc["domain"], {}).setdefault(bucket["bucket"], {
                "bucket": bucket["bucket"], "min": bucket["min"], "max": bucket["max"], "users": {},
                "values": {m: {} for m in metrics}})
            row["users"][doc["model"]] = int(bucket["users"])
            for metric in metrics:
                if bucket["metrics"] is not None:
                    row["values"][metric][doc["model"]] = float(bucket["metrics"][metric])
    return {domain: sorted(rows.values(), key=lambda r: r["min"]) for domain, rows in out.items()}


def _users_text(users: dict[str, int]) -> str:
    low, high = min(users.values()), max(users.values())
    return f"{low:,}" if low == high else f"{low:,}–{high:,}"


def format_buckets(buckets: dict[str, list[dict[str, Any]]], models: Sequence[str], metric: str = "NDCG@10") -> str:
    """Markdown: one row per (domain, bucket), ``metric`` of every model, the best in bold."""
    header = ["Dataset", "Target seen in training", "Users"] + [MODEL_LABELS.get(m, m) for m in models]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---:|" + "---:|" * len(models)]
    for domain, rows in buckets.items():
        for i, row in enumerate(rows):
            values = row["values"][metric]
            top = max((round(v, DECIMALS) for v in values.values()), default=None)
            cells = [domain if i == 0 else "", f"{row['bucket']} times", _users_text(row["users"])]
            for model in models:
                if model not in values:
                    cells.append("–")
                    continue
                text = f"{values[model]:.{DECIMALS}f}"
                cells.append(f"**{text}**" if round(values[model], DECIMALS) == top else text)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def random_ndcg(num_items: int, k: int) -> float:
    """Expected NDCG@k of a uniformly random ranking of ``num_items`` items (one target)."""
    return sum(1.0 / math.log2(r + 2) for r in range(min(k, num_items))) / num_items


def _winner(row: dict[str, float], label: str, metric: str, chance: float | None = None) -> str:
    """'{label}: SASRec wins on NDCG@10 (0.285; next Reo-LM 0.220).' with ties named as such."""
    ranked = sorted(row.items(), key=lambda kv: (-kv[1], MODEL_ORDER.index(kv[0]) if kv[0] in MODEL_ORDER else 99))
    top = round(ranked[0][1], 3)
    winners = [m for m, v in ranked if round(v, 3) == top]
    rest = [(m, v) for m, v in ranked if m not in winners]
    names = " and ".join(MODEL_LABELS.get(m, m) for m in winners)
    verb = "wins" if len(winners) == 1 else "tie"
    tail = f"; next {MODEL_LABELS.get(rest[0][0], rest[0][0])} {rest[0][1]:.3f}" if rest else ""
    tail += f"; a random ranking scores {chance:.3f}" if chance is not None else ""
    return f"{label}: {names} {verb} on {metric} ({top:.3f}{tail})."


def winner_sentences(setting: str, table: ResultsTable, buckets: dict[str, list[dict[str, Any]]],
                     metric: str = "NDCG@10") -> list[str]:
    """One sentence per domain of the setting, and one for its cold targets (bucket min 0, max 0)."""
    sentences = []
    for domain in table.domains:
        row = table.values[domain].get(metric, {})
        if row:
            label = f"{_setting_label(setting)}, {domain} ({table.users[domain]:,} test users)"
            sentences.append(_winner(row, label, metric))
        cold = next((b for b in buckets.get(domain, []) if b["max"] == 0 and b["values"][metric]), None)
        if cold is not None and setting != "warm":
            label = f"{_setting_label(setting)}, {domain}, only users whose target never occurs in training " \
                    f"({_users_text(cold['users'])} users)"
            chance = random_ndcg(table.items[domain], int(metric.split("@")[1])) if metric.startswith("NDCG@") else None
            sentences.append(_winner(cold["values"][metric], label, metric, chance))
    return sentences


def format_report(docs: Sequence[dict[str, Any]], metric: str = "NDCG@10") -> str:
    """The whole markdown report: per setting its table, its buckets and who wins.

    With only warm runs and no buckets this is exactly :func:`format_markdown` of the table.
    """
    groups = group_by_setting(docs)
    parts: list[str] = []
    for setting, group in groups.items():
        table = build_table(group)
        buckets = bucket_values(group)
        if len(groups) > 1 or buckets:
            parts.append(f"## {_setting_label(setting)}\n")
        parts.append(format_markdown(table))
        if buckets:
            parts.append(f"{metric} by how often the test target occurs in the training sequences:\n\n"
                         + format_buckets(buckets, table.models, metric))
        if len(groups) > 1 or buckets:
            parts.append("\n".join(f"- {s}" for s in winner_sentences(setting, table, buckets, metric)) + "\n")
    return "\n".join(parts)


def _setting_key(setting: str) -> str:
    return setting.replace("-", "_").replace("+", "_")


def report_json(docs: Sequence[dict[str, Any]], metric: str = "NDCG@10") -> dict[str, Any]:
    """The main setting's table (warm when present) at the top level, as before; every other
    setting's values under its key (``cold_items``: domain -> metric -> model -> value); all
    tables under ``settings``; each run's buckets under ``by_item_frequency`` (setting ->
    domain -> model -> buckets); the sentences under ``winners``."""
    groups = group_by_setting(docs)
    tables = {setting: build_table(group) for setting, group in groups.items()}
    main = next(iter(groups))
    out: dict[str, Any] = {**tables[main].to_json(), "setting": main}
    for setting, table in tables.items():
        if setting != main:
            out[_setting_key(setting)] = table.values
    out["settings"] = {setting: table.to_json() for setting, table in tables.items()}
    out["by_item_frequency"] = {
        setting: {doc["domain"]: {} for doc in group} for setting, group in groups.items()}
    for setting, group in groups.items():
        for doc in group:
            if doc.get("by_item_frequency"):
                out["by_item_frequency"][setting][doc["domain"]][doc["model"]] = doc["by_item_frequency"]
    out["winners"] = {setting: winner_sentences(setting, tables[setting], bucket_values(group), metric)
                      for setting, group in groups.items()}
    return out


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def _save_figure(fig: Any, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, suffix=".tmp" + out.suffix) as tmp:  # savefig picks the format by suffix
        fig.savefig(tmp, dpi=130, bbox_inches="tight")
    return out


def plot_bars(table: ResultsTable, out: str | Path) -> Path:
    """Grouped bar chart: one panel per metric, datasets on x, one bar per model."""
    plt = _pyplot()
    n_models = len(table.models)
    fig, axes = plt.subplots(1, len(table.metrics), figsize=(4.2 * len(table.metrics) + 1, 3.8), squeeze=False)
    width = 0.8 / n_models
    colors = plt.get_cmap("tab10")
    for ax, metric in zip(axes[0], table.metrics):
        for j, model in enumerate(table.models):
            xs = [i + (j - (n_models - 1) / 2) * width for i in range(len(table.domains))]
            ys = [table.values[d][metric].get(model, 0.0) for d in table.domains]
            ax.bar(xs, ys, width=width, label=MODEL_LABELS[model], color=colors(j % 10),
                   edgecolor="black" if model == "reolm" else None, linewidth=0.8)
        ax.set_xticks(range(len(table.domains)))
        ax.set_xticklabels(table.domains, rotation=20 if len(table.domains) > 3 else 0)
        ax.set_title(TABLE_METRICS.get(metric, metric))
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(n_models, 7), bbox_to_anchor=(0.5, 1.08), frameon=False)
    fig.tight_layout()
    path = _save_figure(fig, out)
    plt.close(fig)
    return path


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """Records of a run's log.jsonl (a truncated last line, from a crash, is skipped)."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{lineno}: not a JSON line") from None
    return records


def plot_curves(run_dirs: Sequence[str | Path], out: str | Path, metric: str = "NDCG@10") -> Path:
    """Training loss and validation ``metric`` per epoch, one line per run (from log.jsonl)."""
    plt = _pyplot()
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.8))
    plotted = 0
    for index, run in enumerate(run_dirs):
        run, color = Path(run), f"C{index % 10}"  # same colour for a run in both panels
        log = run / "log.jsonl"
        if not log.is_file():
            raise FileNotFoundError(f"{log}: missing (curves need the run's JSONL log)")
        records = read_log(log)
        setup = next((r for r in records if r.get("stage") == "setup"), {})
        label = f"{setup.get('domain', run.name)}/{setup.get('model', '?')}"
        train = [(r["epoch"], r["train_loss"]) for r in records if "train_loss" in r]
        val = [(r["epoch"], r["val"][metric]) for r in records if metric in r.get("val", {})]
        if train:
            ax_loss.plot(*zip(*train), label=label, color=color)
        if val:
            ax_val.plot(*zip(*val), marker="o", markersize=3, label=label, color=color)
        plotted += bool(train or val)
    if not plotted:
        raise ValueError("no epoch records with train_loss or validation metrics in the given runs")
    ax_loss.set(title="training loss", xlabel="epoch")
    ax_val.set(title=f"validation {metric}", xlabel="epoch")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = _save_figure(fig, out)
    plt.close(fig)
    return path
