"""Memory per model and backend: the estimate the scheduler plans with, beside what loading and
serving one request really take.

    python benchmarks/footprints.py [--models NAME...] [--json FILE] [--png FILE]

Each model runs on every backend of its catalog entry that this machine has, each in a fresh
process (the engine's libraries are part of what a model node pays): the model is prepared
(fetched and converted beforehand, outside the measurement), loaded, and asked one typical
request of its task (an LLM a 96-token reply, ASR the checkout's longest spoken sample). Columns: the catalog's figure for that backend (memory_mb; "-" where it
gives none), the adapter's estimate from the prepared files (mofa_omni.models.footprint), the
resident growth once loaded and the peak growth through the request, and estimate / peak.
Goal: every estimate within 0.75-1.25x of the measured peak. Prints a table, writes
benchmarks/results/footprints.json (or --json FILE) and a bar chart of estimate and peak per
model and backend, benchmarks/results/footprints.png (or --png FILE).
"""

from __future__ import annotations

import json
import subprocess
import sys

from common import (
    SAMPLES,
    add_output_flags,
    make_parser,
    print_header,
    pyplot,
    run_stamp,
    save_figure,
    write_json,
)

from mofa_omni.adapters.backends import create_adapter, missing_requirement
from mofa_omni.models.catalog import Catalog

MiB = 1 << 20
DEFAULT_MODELS = ["smollm2-135m", "gemma-3-270m", "whisper-tiny.en", "whisper-base",
                  "minilm-l6", "piper-joe"]

# Run in a fresh interpreter: prepare, then measure the load and one request of the task.
PROBE = """
import json, sys
from mofa_omni.adapters.backends import create_adapter
from mofa_omni.contract.tasks import (ChatMessage, ChatRequest, EmbeddingRequest, SpeechRequest,
                                      Task, TranscriptionRequest)
from mofa_omni.models.catalog import Catalog
from mofa_omni.models.memory import peak_resident_bytes, reset_peak_resident, resident_bytes
from mofa_omni.models.store import ModelStore
import numpy as np

name, backend = sys.argv[1], sys.argv[2]
spec = Catalog.load().get(name)
adapter = create_adapter(spec, backend)
model_dir = ModelStore().prepare(adapter)
estimate = adapter.estimate_bytes(model_dir)
figure = spec.memory_bytes_on(adapter.backend)
precise = reset_peak_resident()
before = resident_bytes()
adapter.load(model_dir)
loaded = resident_bytes() - before
task = adapter.tasks[0]
if task == Task.TEXT_GENERATION:
    list(adapter.generate(ChatRequest([ChatMessage("user", "What is the capital of France? "
                                                   "Tell me about its history.")],
                                      max_tokens=96)))  # a voice agent's reply
elif task == Task.SPEECH_RECOGNITION:  # the checkout's longest spoken sample
    from pathlib import Path
    from mofa_omni.media.audio import read_wav, resample
    wav = max(Path(sys.argv[3]).glob("*.wav"), key=lambda p: p.stat().st_size)
    audio, rate = read_wav(wav)
    adapter.transcribe(TranscriptionRequest(resample(audio, rate, 16000), 16000))
elif task == Task.SPEECH_SYNTHESIS:
    list(adapter.synthesize(SpeechRequest("The weather is fine today, and the sea is calm.")))
elif task == Task.EMBEDDING:
    adapter.embed(EmbeddingRequest([f"Sentence {i} about the weather." for i in range(16)]))
peak = (peak_resident_bytes() if precise else resident_bytes()) - before
print(json.dumps({"model": name, "backend": adapter.backend, "adapter": spec.adapter,
                  "catalog_bytes": figure, "estimate_bytes": estimate, "loaded_bytes": loaded,
                  "peak_bytes": max(peak, loaded)}))
"""


def backends_of(name: str, catalog: Catalog) -> list[str]:
    """The backends this machine has among those of ``name``'s adapters."""
    from mofa_omni.adapters.base import adapter_class

    spec = catalog.get(name)
    found = []
    for adapter in spec.adapters or (spec.adapter,):
        if missing_requirement(adapter) is None:
            backend = adapter_class(adapter).backend
            if backend not in found:
                found.append(backend)
    return found


def measure(name: str, backend: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, name, backend, str(SAMPLES)],
                          capture_output=True,
                          text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name} on {backend}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    print_header(f"{'model':18} {'backend':12} {'catalog':>9} {'estimate':>9} {'loaded':>9} "
                 f"{'peak':>9} {'est./peak':>9}   (MiB)")
    for row in rows:
        catalog = f"{row['catalog_bytes'] / MiB:.0f}" if row["catalog_bytes"] else "-"
        print(f"{row['model']:18} {row['backend']:12} {catalog:>9} "
              f"{row['estimate_bytes'] / MiB:9.0f} {row['loaded_bytes'] / MiB:9.0f} "
              f"{row['peak_bytes'] / MiB:9.0f} {row['ratio']:9.2f}")


def plot(rows: list[dict], path) -> None:
    plt = pyplot()
    figure, ax = plt.subplots(figsize=(11, 5))
    labels = [f"{r['model']} ({r['backend']})" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["estimate_bytes"] / MiB for r in rows], 0.4,
           label="estimate from the files")
    ax.bar([i + 0.2 for i in x], [r["peak_bytes"] / MiB for r in rows], 0.4,
           label="measured peak (load + one request)")
    ax.set_xticks(list(x), labels, fontsize=8, rotation=30, ha="right")
    ax.set_ylabel("MiB")
    ax.set_title("Memory per model and backend: estimate before loading vs measured")
    ax.legend()
    figure.tight_layout()
    save_figure(figure, path)


def main() -> int:
    parser = make_parser(__doc__, full_help=True)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    add_output_flags(parser, "footprints.json", "footprints.png")
    args = parser.parse_args()
    catalog = Catalog.load()
    rows = []
    for name in args.models:
        for backend in backends_of(name, catalog):
            create_adapter(catalog.get(name), backend)  # an unknown model fails here, at once
            print(f"measuring {name} on {backend} ...", file=sys.stderr, flush=True)
            row = measure(name, backend)
            row["ratio"] = row["estimate_bytes"] / row["peak_bytes"]
            rows.append(row)
    print_table(rows)
    write_json(args.json, {**run_stamp(), "rows": rows})
    plot(rows, args.png)
    print(f"\nwrote {args.json} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
