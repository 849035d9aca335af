#!/usr/bin/env bash
# Create a Python environment that can run a real ComfyUI with this pack installed.
#
#   COMFYUI_DIR=/path/to/ComfyUI tests/comfyui/setup_comfyui.sh
#
# Environment:
#   COMFYUI_DIR        ComfyUI checkout (required)
#   COMFYUI_VENV       where to create the environment (default: $COMFYUI_DIR/.venv-kinema)
#   PYTHON             interpreter used to create it (default: python3)
#   KINEMA_TORCH       torch version (default 2.14.1), KINEMA_TORCHVISION (default 0.29.1)
#
# torch and torchvision are installed first and pinned, so ComfyUI's unpinned "torch"
# requirement cannot pull another build. The script is idempotent: a stamp file records the
# requirement files it was built from.
set -euo pipefail
: "${COMFYUI_DIR:?set COMFYUI_DIR to a ComfyUI checkout}"
HERE="$(cd "$(dirname "$0")" && pwd)"
PACK="$(cd "$HERE/../.." && pwd)"
VENV="${COMFYUI_VENV:-$COMFYUI_DIR/.venv-kinema}"
PY="${PYTHON:-python3}"
[ -f "$COMFYUI_DIR/main.py" ] || { echo "COMFYUI_DIR=$COMFYUI_DIR has no main.py" >&2; exit 2; }
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.kinema-setup"
want="$(cat "$COMFYUI_DIR/requirements.txt" "$PACK/requirements.txt" | sha1sum | cut -c1-12)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q "torch==${KINEMA_TORCH:-2.14.1}" "torchvision==${KINEMA_TORCHVISION:-0.29.1}"
  "$VENV/bin/python" -m pip install -q -r "$COMFYUI_DIR/requirements.txt" -r "$PACK/requirements.txt"
  echo "$want" > "$stamp"
fi
echo "$VENV/bin/python"
