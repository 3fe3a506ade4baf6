#!/usr/bin/env bash
# One idempotent set-up for the demo and the tests: system libraries, a virtual
# environment with the project, and the default models (fetched and converted once).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

# 1. System libraries (Linux): OpenBLAS makes MLX's CPU backend ~17x faster; espeak-ng
#    speaks test sentences in a second, independent voice. macOS needs neither.
if [ "$(uname -s)" = Linux ] && command -v apt-get >/dev/null; then
  missing=()
  ls /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 >/dev/null 2>&1 || missing+=(libopenblas0-pthread)
  command -v espeak-ng >/dev/null || missing+=(espeak-ng)
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing ${missing[*]} (apt)"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

# 2. The virtual environment, reinstalled only when pyproject.toml changed.
stamp="$VENV/.mofa-omni-setup"
want=$(cat pyproject.toml scripts/setup.sh | cksum)
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e '.[piper,dev]'
  # mlx-whisper's metadata requires torch, which it only uses to convert checkpoints:
  # install it alone; its runtime needs are in pyproject.toml.
  "$VENV/bin/python" -m pip install --quiet --no-deps mlx-whisper==0.4.3
  # mlx-vlm's metadata pulls 64 packages (opencv, datasets, mlx-audio, a web server) that
  # inference never imports: install it alone; what it does import is in pyproject.toml.
  "$VENV/bin/python" -m pip install --quiet --no-deps mlx-vlm==0.7.10
  # mflux's metadata requires torch and the CUDA build of MLX; its FLUX.2 pipeline uses
  # neither: install it alone; what it imports is in pyproject.toml.
  "$VENV/bin/python" -m pip install --quiet --no-deps mflux==0.24.0
  echo "$want" > "$stamp"
fi

# 3. The default models and the voice activity detector: fetched from their catalog
#    sources and converted once (cached).
"$VENV/bin/omni" pull --defaults silero-vad
