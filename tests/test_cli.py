"""One command-line surface: `reolm COMMAND`, with launch/*.py as the same commands run as scripts."""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reolm.cli import COMMANDS

from launch_helpers import run_env

REPO = Path(__file__).resolve().parents[1]
SHIMS = {"finetune": "launch/finetune.py", "evaluate": "launch/evaluate.py", "pretrain": "launch/pretrain.py",
         "demo": "launch/demo.py", "reproduce": "launch/reproduce.py"}


def run(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**run_env(), **env})


def test_help_lists_every_command_once():
    out = run(["-m", "reolm", "--help"]).stdout
    for name in ("pretrain", "finetune", "evaluate", "reproduce", "demo", "embed", "serve"):
        assert re.search(rf"^    {name}(\s|$)", out, re.M), out
    assert len(COMMANDS) == len({module for module, _ in COMMANDS.values()})


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_module_has_the_interface_and_no_second_help_line(name):
    module = importlib.import_module(f"reolm.commands.{COMMANDS[name][0]}")
    assert callable(module.add_arguments) and callable(module.run) and module.DESCRIPTION.strip()
    assert not hasattr(module, "HELP"), f"{name}: the one-line help lives in reolm.cli.COMMANDS only"
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)  # the options build without error


def test_nothing_patches_sys_path():
    offenders = [str(p.relative_to(REPO)) for folder in ("launch", "reolm") for p in (REPO / folder).rglob("*.py")
                 if "sys.path.insert" in p.read_text()]
    assert offenders == []


@pytest.mark.parametrize("name", sorted(SHIMS))
def test_launch_scripts_are_the_same_commands(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps help at the terminal's width: the same in both
    script = run([SHIMS[name], "--help"], COLUMNS="100")
    from reolm.cli import main
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert script.returncode == done.value.code == 0, script.stderr
    assert script.stdout == capsys.readouterr().out and f"usage: reolm {name}" in script.stdout


def test_one_error_handler_names_the_command_the_file_and_the_rank(tmp_path):
    missing = tmp_path / "no-such-domain"
    proc = run(["launch/finetune.py", "--domain", str(missing), "--out", str(tmp_path / "run"), "--model", "pop"])
    assert proc.returncode == 1 and proc.stderr.startswith("reolm finetune: error: ")
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr
    proc = run(["launch/pretrain.py", "--config", str(tmp_path / "absent.yaml")], WORLD_SIZE="2", RANK="1")
    assert proc.returncode == 1 and proc.stderr.startswith("reolm pretrain: error (rank 1): ")
    assert "absent.yaml" in proc.stderr and "Traceback" not in proc.stderr
    proc = run(["launch/pretrain.py", "--config", str(tmp_path / "absent.yaml")], REOLM_DEBUG="1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr  # REOLM_DEBUG=1 shows where it failed
