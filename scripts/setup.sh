#!/usr/bin/env bash
# One idempotent set-up for the demo and the tests: system libraries, a virtual
# environment with the project, and the default models (fetched and converted once).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

# 1. System libraries (Linux): OpenBLAS makes MLX's CPU backend ~17x faster; espeak-ng
#    speaks test sentences in a second, independent voice; a C++ compiler builds llama.cpp.
#    macOS needs none of them.
if [ "$(uname -s)" = Linux ] && command -v apt-get >/dev/null; then
  missing=()
  ls /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 >/dev/null 2>&1 || missing+=(libopenblas0-pthread)
  command -v espeak-ng >/dev/null || missing+=(espeak-ng)
  [ "${LLAMA_CPP:-1}" = 0 ] || command -v c++ >/dev/null || missing+=(g++)  # builds llama.cpp
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing ${missing[*]} (apt)"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

# 2. The virtual environment, reinstalled only when pyproject.toml changed.
stamp="$VENV/.mofa-omni-setup"
want=$(cat pyproject.toml scripts/setup.sh runtime/adapters/installs.py | cksum)
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e '.[all,dev]'
  # The engines pip cannot install as plain requirements (runtime/adapters/installs.py says
  # why): mlx-whisper, mlx-vlm and mlx-gen (mflux) without the torch/CUDA their metadata declares, and
  # llama.cpp, the fastest LLM engine on a Linux CPU (1.5x CTranslate2 int8 decoding here),
  # built once from source. LLAMA_CPP=0 skips it; a failed build only warns: CTranslate2 then
  # serves the LLM (`omni doctor` says which engine runs and why).
  "$VENV/bin/omni" install mlx-whisper mlx-vlm mlx-gen
  if [ "$(uname -s)" = Linux ] && [ "${LLAMA_CPP:-1}" != 0 ]; then
    "$VENV/bin/omni" install llama-cpp \
      || echo "setup: WARNING: llama.cpp could not be built; CTranslate2 serves the LLM"
  fi
  echo "$want" > "$stamp"
fi

# 3. The default models, the voice activity detector and the turn-end model: fetched from their catalog
#    sources and converted once (cached).
"$VENV/bin/omni" pull --defaults silero-vad smart-turn-v3
