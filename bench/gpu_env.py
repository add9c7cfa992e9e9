#!/usr/bin/env python
"""What the GPU figures were measured with: torch (and the version the project pins), CUDA, cuDNN,
DeepSpeed, the NVIDIA driver and the GPU's name, written as JSON before anything else runs.

    python bench/gpu_env.py --out DIR/environment_gpu.json

Exits 1 (after writing the JSON) when torch sees no CUDA device: every later GPU step would fail.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def pinned_torch(makefile: Path = REPO / "Makefile") -> str | None:
    """The torch version the Makefile installs (``TORCH_SPEC ?= torch==X``), the one the CPU suite runs."""
    found = re.search(r"^TORCH_SPEC\s*\?=\s*torch==(\S+)", makefile.read_text(), re.MULTILINE)
    return found.group(1) if found else None


def nvidia_smi() -> dict[str, Any]:
    """GPU name and driver version as the driver reports them (empty without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return {}
    proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=20)
    rows = [[c.strip() for c in line.split(",")] for line in proc.stdout.splitlines() if line.strip()]
    return {"gpus": [r[0] for r in rows], "driver": rows[0][1] if rows else None} if proc.returncode == 0 else {}


def environment() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "torch_pinned": pinned_torch(),
                            "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    info["torch_matches_pin"] = info["torch"].split("+")[0] == info["torch_pinned"]
    try:
        import deepspeed
        info["deepspeed"] = deepspeed.__version__
    except ImportError as err:
        info["deepspeed"] = f"not importable: {err}"
    if info["cuda_available"]:
        info["gpu"] = torch.cuda.get_device_name()
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    return info | nvidia_smi()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="environment_gpu.json",
                        help="result JSON: a file name under bench/results/, or a path")
    args = parser.parse_args(argv)
    from common import write_result

    info = environment()
    print(f"wrote {write_result(args.out, info)}")
    print(info)
    if not info["cuda_available"]:
        print("gpu_env.py: torch sees no CUDA device", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
