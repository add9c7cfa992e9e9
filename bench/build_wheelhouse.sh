#!/usr/bin/env bash
# Fill .whl/ (git-ignored) on a CPU machine with network, for bench/gpu_acceptance.sh on a bare GPU box.
#
#   bash bench/build_wheelhouse.sh [--backbone HF_DIR]
#   bash bench/build_wheelhouse.sh --dry-run   # list what the image has and what would be fetched
#
# The GPU image (docs/gpu.md) has the packages in IMAGE_HAS below, but not deepspeed, webdataset,
# hjson, pydantic, pydantic-core, braceexpand or pytest. This puts exactly those (and their small
# pure-Python dependencies) in .whl/, at the versions of this machine's environment (the ones the
# CPU suite passes with):
#   * deepspeed ships only as a source archive: `pip wheel` builds it here without ops
#     (DS_BUILD_OPS=0) into a pure-Python wheel; we use torch's AdamW, so nothing JIT-compiles there;
#   * pydantic-core is compiled: one manylinux wheel per CPython 3.10-3.13, since the image's Python
#     version is not known here.
# --backbone HF_DIR also stores that checkpoint (e.g. all-MiniLM-L6-v2) as fp16 safetensors under
# .whl/backbone/ (~45 MB for MiniLM-L6), so the GPU fine-tuning figures use the real model. Keep
# .whl/ under ~60 MiB in all: it is copied to the GPU box with the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=.whl
BACKBONE=""
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --backbone) BACKBONE=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "build_wheelhouse.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

# What the bare GPU image already has (docs/gpu.md); everything else the GPU steps import is fetched.
IMAGE_HAS=(torch transformers tokenizers safetensors accelerate numpy einops msgpack ninja psutil py-cpuinfo
           pyyaml tqdm pillow)
# Pure-Python packages, pinned to this environment's versions.
PURE=(hjson webdataset braceexpand pydantic annotated-types typing-inspection typing-extensions
      pytest pluggy iniconfig pygments packaging)
SPECS=()
for p in "${PURE[@]}"; do SPECS+=("$p==$(version "$p")"); done
CORE="pydantic-core==$(version pydantic-core)"
DS="deepspeed==$(version deepspeed)"
if [ "$DRY" = 1 ]; then
  echo "image has: ${IMAGE_HAS[*]}"
  echo "would download: ${SPECS[*]}"
  echo "would download for CPython 3.10-3.13: $CORE"
  echo "would build without ops: $DS"
  [ -n "$BACKBONE" ] && echo "would store $BACKBONE as fp16 in $OUT/backbone"
  exit 0
fi
mkdir -p "$OUT"
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$OUT" "${SPECS[@]}"

# pydantic-core for every CPython the image might have.
for v in 3.10 3.11 3.12 3.13; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$v" \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$OUT" "$CORE"
done

# DeepSpeed: a pure-Python wheel built from the source archive (seconds, no CUDA needed).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$DS"

if [ -n "$BACKBONE" ]; then
  "$PY" - "$BACKBONE" "$OUT/backbone" <<'EOF'
import shutil, sys
from pathlib import Path
from safetensors.torch import save_file
from reolm.model.hf_checkpoint import read_state_dict
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
state = {k: v.half().contiguous() if v.is_floating_point() else v for k, v in read_state_dict(src).items()}
save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
             "vocab.json", "merges.txt"):
    if (src / name).is_file():
        shutil.copy(src / name, dst / name)
print(f"stored {src} as fp16 in {dst}")
EOF
fi
du -sh "$OUT"
ls "$OUT"
