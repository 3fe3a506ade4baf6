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
  # llama.cpp, the fastest LLM engine on a Linux CPU (1.5x CTranslate2 int8 decoding here),
  # has no binary wheel on PyPI: built once from source, for the CPU features every x86-64
  # machine with AVX2 has (not -march=native: it picks up instructions some virtual machines
  # advertise but fault on). pip keeps the wheel. LLAMA_CPP=0 skips it; a failed build only
  # warns: CTranslate2 then serves the LLM (`omni doctor` says which engine runs and why).
  if [ "$(uname -s)" = Linux ] && [ "${LLAMA_CPP:-1}" != 0 ]; then
    cmake="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
    cmake+=" -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF"
    if [ "$(uname -m)" = x86_64 ] && grep -qw avx2 /proc/cpuinfo && grep -qw fma /proc/cpuinfo \
        && grep -qw f16c /proc/cpuinfo; then
      cmake+=" -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    fi
    echo "setup: llama-cpp-python (built from source once: a few minutes)"
    CMAKE_ARGS="$cmake" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "$VENV/bin/python" -m pip install --quiet llama-cpp-python==0.3.36 \
      || echo "setup: WARNING: llama.cpp could not be built; CTranslate2 serves the LLM"
  fi
  echo "$want" > "$stamp"
fi

# 3. The default models and the voice activity detector: fetched from their catalog
#    sources and converted once (cached).
"$VENV/bin/omni" pull --defaults silero-vad
