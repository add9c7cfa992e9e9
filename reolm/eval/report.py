"""Results table (the paper's Table 2 layout) and plots from run directories.

Rows are datasets x {N@10, R@10, MRR}, columns are models; the best value of each row is
bold; ``Improv.`` is the relative gain of Reo-LM (``reolm``) over the best *baseline*
(pop, GRU4Rec, SASRec, BERT4Rec; Reo-LM ablations are not baselines).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from reolm.eval.contract import MODEL_NAMES, read_metrics

__all__ = ["TABLE_METRICS", "MODEL_ORDER", "BASELINE_MODELS", "MODEL_LABELS", "ResultsTable", "load_runs",
           "build_table", "format_markdown", "plot_bars", "plot_curves", "read_log"]

TABLE_METRICS: dict[str, str] = {"NDCG@10": "N@10", "Recall@10": "R@10", "MRR": "MRR"}
MODEL_ORDER = ("pop", "gru4rec", "sasrec", "bert4rec", "plm-zeroshot", "reolm-zeroshot", "reolm-nopretrain",
               "reolm")
BASELINE_MODELS = frozenset({"pop", "gru4rec", "sasrec", "bert4rec"})
MODEL_LABELS = {"pop": "Pop", "gru4rec": "GRU4Rec", "sasrec": "SASRec", "bert4rec": "BERT4Rec",
                "plm-zeroshot": "PLM (zero-shot)", "reolm-zeroshot": "Reo-LM (zero-shot)", "reolm-nopretrain": "Reo-LM (no pre-train)",
                "reolm": "Reo-LM"}
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

    def to_json(self) -> dict[str, Any]:
        return {"domains": self.domains, "models": self.models, "metrics": self.metrics, "values": self.values,
                "best": self.best, "improvement_pct": self.improvement, "runs": self.runs}


def load_runs(run_dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Validated metrics.json of each run (a run dir or the metrics file itself), with ``run_dir`` added."""
    docs = []
    for run in run_dirs:
        path = Path(run)
        path = path / "metrics.json" if path.is_dir() else path
        doc = read_metrics(path)
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
    table = ResultsTable(domains, models, list(metrics), values, runs=[d.get("run_dir", "?") for d in docs])
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


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def _save_figure(fig: Any, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp" + out.suffix)
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    tmp.replace(out)
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
