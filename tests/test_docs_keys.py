"""Docs that cannot drift: every backticked config key in README.md and docs/*.md is a real key.

A backticked dotted name (`train.lr`, `reolm.model.max_tokens`, `optim.lr=1e-4`) whose first part
is a top-level section of an entry point's config (pre-training, fine-tuning, embed, serve,
reproduce) is read as a config key, and must name a field of that section (a renamed key is not
one: the config refuses it). Not keys, and left alone: names whose last part is a file extension
(`train.json`, `model.safetensors`) and Python names of the package (`reolm.eval.ranking`,
`reolm.io.atomic_dir`, or `data.StreamTracker` for a class of a module `data.py`), which
must exist instead. A Python attribute that happens to start like a
section is written with its class (`ReoLM.backbone_config`, not `model.backbone_config`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import re
import typing
from pathlib import Path

import pytest

from reolm.finetune.config import FinetuneConfig
from reolm.recipe import RecipeConfig
from reolm.serve.config import EmbedConfig, ServeConfig
from reolm.train.config import PretrainConfig

REPO = Path(__file__).resolve().parents[1]
ROOTS = (PretrainConfig, FinetuneConfig, EmbedConfig, ServeConfig, RecipeConfig)
FILE_EXTENSIONS = {"json", "jsonl", "yaml", "yml", "md", "py", "safetensors", "npy", "txt", "faiss", "tar",
                   "csv", "gz", "pt", "bin", "log", "sh", "toml", "parquet"}
_BACKTICKED = re.compile(r"`([^`\n]+)`")
_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.\w+)+")


def _sections(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


TOP_SECTIONS: dict[str, list[type]] = {}
for _root in ROOTS:
    for _name, _cls in _sections(_root).items():
        TOP_SECTIONS.setdefault(_name, []).append(_cls)


def is_config_key(path: list[str]) -> bool:
    """``path`` names a field, through nested sections, of some entry point's section ``path[0]``."""
    for cls in TOP_SECTIONS.get(path[0], []):
        for i, part in enumerate(path[1:], 1):
            names = {f.name for f in dataclasses.fields(cls)}
            if part not in names:
                break
            if i == len(path) - 1:
                return True
            cls = _sections(cls).get(part)
            if cls is None:
                break
    return False


@functools.lru_cache(maxsize=None)
def _top_level_names(module: Path) -> frozenset[str]:
    names: set[str] = set()
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return frozenset(names)


def _names_in(where: Path, parts: list[str]) -> bool:
    """``parts`` are submodules of the package or module ``where``, then at most one top-level name."""
    for i, part in enumerate(parts):
        if where.is_dir() and (where / part / "__init__.py").is_file():
            where = where / part
        elif where.is_dir() and (where / f"{part}.py").is_file():
            where = where / f"{part}.py"
        else:
            module = where / "__init__.py" if where.is_dir() else where
            return i == len(parts) - 1 and part in _top_level_names(module)
    return True


def is_python_path(path: list[str]) -> bool:
    """A Python name of the package: ``reolm.pkg.module[.name]``, or ``module.name`` for a module
    of the package (`data.StreamTracker` in a page about ``reolm/train/``), where the modules
    exist and the name is defined at the module's top level."""
    if path[0] == "reolm":
        return _names_in(REPO / "reolm", path[1:])
    modules = [*(REPO / "reolm").rglob(f"{path[0]}.py"), *(REPO / "reolm").rglob(f"{path[0]}/__init__.py")]
    return any(_names_in(m.parent if m.name == "__init__.py" else m, path[1:]) for m in modules)


def config_like_names(text: str) -> list[tuple[int, str]]:
    """(line, name) of every backticked dotted name that starts with a config section."""
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for span in _BACKTICKED.findall(line):
            for word in span.split():
                match = _DOTTED.match(word)  # `optim.lr=1e-4` -> optim.lr
                if match is None:
                    continue
                name = match.group(0)
                parts = name.split(".")
                if parts[0] in TOP_SECTIONS and parts[-1] not in FILE_EXTENSIONS:
                    found.append((lineno, name))
    return found


DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_backticked_config_key_is_real(doc):
    wrong = [f"{doc.relative_to(REPO)}:{lineno}: `{name}`" for lineno, name in config_like_names(doc.read_text())
             if not is_config_key(name.split(".")) and not is_python_path(name.split("."))]
    assert not wrong, "not a config key (nor a file name or a reolm.* Python path):\n" + "\n".join(wrong)


def test_the_check_tells_keys_files_and_python_apart():
    """The rule itself: it must have caught `loss.temperature` (the key is model.temperature)."""
    text = ("`loss.temperature` `model.temperature` `reolm.model.max_tokens=512` `train.json` `reolm.io.atomic_dir` "
            "`reolm.model.hf_checkpoint` `reolm.no_such_module` `index.kind=ivf index.ivf_nprobe=32` `cfg.reolm` "
            "`model.tokenizer` `ckpt.max_items` `data.StreamTracker` `data.no_such_function` "
            "`reolm.io.atomic_dir.deeper`")
    names = [name for _, name in config_like_names(text)]
    assert names == ["loss.temperature", "model.temperature", "reolm.model.max_tokens", "reolm.io.atomic_dir",
                     "reolm.model.hf_checkpoint", "reolm.no_such_module", "index.kind", "index.ivf_nprobe",
                     "model.tokenizer", "ckpt.max_items", "data.StreamTracker", "data.no_such_function",
                     "reolm.io.atomic_dir.deeper"]
    good = {name for name in names if is_config_key(name.split(".")) or is_python_path(name.split("."))}
    assert good == {"model.temperature", "reolm.model.max_tokens", "reolm.io.atomic_dir", "reolm.model.hf_checkpoint",
                    "index.kind", "index.ivf_nprobe", "data.StreamTracker"}
    assert not is_config_key(["model", "max_items"])  # renamed (to max_history_items): refused by the config
