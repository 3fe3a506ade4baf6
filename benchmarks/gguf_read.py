"""Reading a GGUF file's metadata and tensor index: the project's reader
(mofa_omni.formats.gguf_file) against gguf-py's GGUFReader, on the same files in the same run.

    python benchmarks/gguf_read.py [--files FILE...] [--rounds N] [--json FILE] [--png FILE]

By default the GGUF files of the model cache (those `make setup` and `omni pull` put there).
Each reader opens each file ``--rounds`` times, alternating which goes first, with the page
cache warm (both read the same bytes: this times parsing, not the disk). Before timing, the
two readers' keys, values and tensor indexes are checked equal. Prints a table (median
seconds each, and the ratio gguf-py / ours), writes benchmarks/results/gguf_read.json (or
--json FILE) and a bar chart, benchmarks/results/gguf_read.png (or --png FILE).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from common import (
    add_output_flags,
    make_parser,
    median,
    print_header,
    pyplot,
    run_stamp,
    save_figure,
    write_json,
)

from mofa_omni.formats.gguf_file import GGUFFile
from mofa_omni.models.store import ModelStore


def cached_ggufs() -> list[Path]:
    """One GGUF per model of the cache (its builds and sources hold the same file)."""
    seen, files = set(), []
    for path in sorted(ModelStore().root.rglob("*.gguf")):
        if path.stat().st_size not in seen:
            seen.add(path.stat().st_size)
            files.append(path)
    return files


def check_same(path: Path) -> tuple[int, int, int]:
    """Both readers see the same keys, values and tensors; (keys, tensors, vocabulary)."""
    import gguf

    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
    assert list(ours.fields) == keys, path
    for key in keys:  # gguf-py flattens arrays of arrays; GGUF tokenizers have none
        assert ours.fields[key].contents() == theirs.fields[key].contents(), (path, key)
    for mine, reference in zip(ours.tensors, theirs.tensors, strict=True):
        assert (mine.name, mine.tensor_type, mine.n_bytes, mine.data_offset) == (
            reference.name, reference.tensor_type, reference.n_bytes, reference.data_offset)
        assert mine.data.shape == reference.data.shape
    tokens = ours.fields.get("tokenizer.ggml.tokens")
    return len(keys), len(ours.tensors), len(tokens.value) if tokens else 0


def time_readers(path: Path, rounds: int) -> dict[str, list[float]]:
    import gguf

    readers = {"ours": GGUFFile, "gguf-py": gguf.GGUFReader}
    seconds: dict[str, list[float]] = {name: [] for name in readers}
    for round_ in range(rounds):
        order = list(readers) if round_ % 2 == 0 else list(reversed(readers))
        for name in order:
            started = time.perf_counter()
            readers[name](path)
            seconds[name].append(time.perf_counter() - started)
    return seconds


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    figure, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["gguf_py_s"] for r in rows], 0.4, label="gguf-py GGUFReader")
    ax.bar(x + 0.2, [r["ours_s"] for r in rows], 0.4, label="mofa_omni.formats.gguf_file")
    ax.set_xticks(x, [f"{r['file']}\n({r['vocabulary']} tokens)" for r in rows], fontsize=8)
    ax.set_ylabel("seconds to read the header (median)")
    ax.set_title("Reading a GGUF header: metadata and tensor index")
    ax.legend()
    figure.tight_layout()
    save_figure(figure, path)


def main() -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--files", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    add_output_flags(parser, "gguf_read.json", "gguf_read.png")
    args = parser.parse_args()
    files = args.files or cached_ggufs()
    if not files:
        print("no GGUF files in the model cache: run `make setup` or pass --files", file=sys.stderr)
        return 2
    rows = []
    for path in files:
        keys, tensors, vocabulary = check_same(path)
        seconds = time_readers(path, args.rounds)
        rows.append({"file": f"{path.parent.name}/{path.name}", "bytes": path.stat().st_size,
                     "keys": keys, "tensors": tensors, "vocabulary": vocabulary,
                     "ours_s": median(seconds["ours"]), "gguf_py_s": median(seconds["gguf-py"]),
                     "rounds": seconds})
        rows[-1]["ratio"] = rows[-1]["gguf_py_s"] / rows[-1]["ours_s"]
    print_header(f"{'file':44} {'vocabulary':>10} {'tensors':>8} {'ours s':>8} "
                 f"{'gguf-py s':>9} {'gguf-py/ours':>12}")
    for row in rows:
        print(f"{row['file']:44} {row['vocabulary']:10d} {row['tensors']:8d} "
              f"{row['ours_s']:8.3f} {row['gguf_py_s']:9.3f} {row['ratio']:11.1f}x")
    write_json(args.json, {**run_stamp(), "rounds": args.rounds, "rows": rows})
    plot(rows, args.png)
    print(f"\nwrote {args.json} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
