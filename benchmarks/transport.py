"""Moving a payload from one step to the next: fused in one process, through dora between two
processes, through a multiprocessing queue -- against one memcpy of the same size, in one run.

    python benchmarks/transport.py [--quick] [--sizes SIZE...] [--json FILE] [--png FILE]

(Run it with the project's environment first on PATH: dora starts `.py` nodes with `python`.)

Payloads of 8 B, 1 KiB, 64 KiB, 1 MiB, 16 MiB and 64 MiB, each in two shapes: a uint8 image
(H x W x 3, the nearest image within 1 % of the size; 1-D where there is none) and float32
audio (1-D samples). Every path sends them ping-pong -- the next message only once the
receiver's small ack came back, so nothing queues -- after a few warm-up messages that are not
counted (300 messages per case up to 64 KiB, 200 at 1 MiB, 60 at 16 MiB, 20 at 64 MiB):

  fused           a StagePipeline of two stages in this process (mofa_omni.contract.stages): the producer
                  returns a Tensor holding a pre-built MLX array, the consumer takes it; latency
                  is the Handoff's seconds (producer returned -> consumer started). Bytes copied
                  are 0 when the consumer sees the MLX array's memory at the producer's address
                  (np.asarray of an MLX array is a view), the payload's size otherwise
  dora default    benchmarks/dataflows/transport.yml under `dora run`: a sender node sends the
                  numpy payload wrapped as Arrow without a copy, the receiver reads it through a
                  zero-copy numpy view and acks; dora's default shared-memory pool (~8 MB in
                  dora 1.1.0: larger messages take the daemon path, which refuses > 64 MiB --
                  such a case is recorded as failed)
  dora tuned      the same, transport_tuned.yml: `shared_memory_pool_size` on the sender of
                  3 x 64 MiB + 1 MiB
  pickle queue    a multiprocessing.Queue to a spawned child process (the queue pickles the
                  numpy array), the ack on a second queue
  memcpy          np.copyto into a preallocated array of the same size: the physical reference

Latency is one-way: the receiver's time.monotonic_ns() (the payload in hand) minus the sender's,
taken just before sending (so the sender's own copy counts); CLOCK_MONOTONIC is one clock for
every process on Linux. Per case and path: median, p99 (with 20 messages, about the largest)
and messages/s (messages over the ping-pong loop's time, acks included).

Goals, at 16 MiB: dora tuned at most 2x one memcpy and at least 10x faster than the pickle
queue; fused copies 0 bytes and takes at most 50 us at every size.
Prints a table, writes benchmarks/results/transport.json (or --json FILE) and a plot of latency
against payload size, benchmarks/results/transport.png (or --png FILE). About 40 s on a 2-core
machine (--quick: 3 sizes, fewer messages, about 10 s).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
from common import (
    FLOWS,
    DoraRun,
    add_output_flags,
    dora_env,
    machine,
    make_parser,
    median,
    percentile,
    print_header,
    pyplot,
    save_figure,
    write_json,
)

SIZES = {"8B": 8, "1KiB": 1 << 10, "64KiB": 64 << 10, "1MiB": 1 << 20, "16MiB": 16 << 20,
         "64MiB": 64 << 20}
QUICK_SIZES = ["8B", "1MiB", "16MiB"]
GOAL_SIZE = "16MiB"
PATHS = ["fused", "dora default", "dora tuned", "pickle queue", "memcpy"]
DORA_FLOWS = {"dora default": FLOWS / "transport.yml", "dora tuned": FLOWS / "transport_tuned.yml"}
DORA_TIMEOUT_S = 300


@dataclass(frozen=True)
class Case:
    """One payload: its nominal size, shape and how many messages carry it."""

    size: str  # a key of SIZES
    kind: str  # "image uint8" | "audio float32"
    dtype: str
    shape: list[int]
    warmup: int
    reps: int

    @property
    def label(self) -> str:
        return f"{self.size} {self.kind}"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def image_shape(nbytes: int) -> list[int]:
    """H x W x 3 within 1 % of ``nbytes`` (powers of two are never a multiple of 3), else 1-D."""
    pixels = nbytes // 3
    height = math.isqrt(pixels)
    width = pixels // height if height else 0
    if height and abs(height * width * 3 - nbytes) <= nbytes / 100:
        return [height, width, 3]
    return [nbytes]


def messages_for(nbytes: int, quick: bool) -> tuple[int, int]:
    """(warm-up, counted) messages: fewer for big payloads."""
    if nbytes <= 64 << 10:
        warmup, reps = 5, 300
    elif nbytes <= 1 << 20:
        warmup, reps = 5, 200
    elif nbytes <= 16 << 20:
        warmup, reps = 3, 60
    else:
        warmup, reps = 2, 20
    return (2, max(reps // 5, 5)) if quick else (warmup, reps)


def plan(sizes: list[str], quick: bool) -> list[Case]:
    cases = []
    for size in sizes:
        nbytes = SIZES[size]
        warmup, reps = messages_for(nbytes, quick)
        cases.append(Case(size, "image uint8", "uint8", image_shape(nbytes), warmup, reps))
        cases.append(Case(size, "audio float32", "float32", [nbytes // 4], warmup, reps))
    return cases


def build_payload(case: Case) -> np.ndarray:
    """Random content, so that every page is really there (no lazily mapped zero pages)."""
    rng = np.random.default_rng(0)
    if case.dtype == "uint8":
        return rng.integers(0, 256, size=case.shape, dtype=np.uint8)
    return rng.random(case.shape, dtype=np.float32)


def address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def summary(latencies_s: list[float], elapsed_s: float) -> dict:
    return {"median_s": median(latencies_s), "p99_s": percentile(latencies_s, 99),
            "messages_per_s": len(latencies_s) / elapsed_s, "messages": len(latencies_s)}


# --- the paths ------------------------------------------------------------------------------

def measure_memcpy(case: Case) -> dict:
    source = build_payload(case)
    target = np.empty_like(source)
    latencies = []
    for index in range(case.warmup + case.reps):
        if index == case.warmup:
            latencies, started = [], time.perf_counter()
        before = time.perf_counter()
        np.copyto(target, source)
        latencies.append(time.perf_counter() - before)
    return summary(latencies, time.perf_counter() - started)


def measure_fused(case: Case) -> dict:
    """Two stages in this process; the consumer notes where the array it got lives."""
    import mlx.core as mx

    from mofa_omni.contract.stages import Handoff, Stage, StagePipeline
    from mofa_omni.contract.tasks import Tensor

    produced = mx.array(build_payload(case))
    mx.eval(produced)
    produced_at = address(np.asarray(produced))
    seen_at: list[int] = []
    handoffs: list[Handoff] = []

    def produce(_: Tensor) -> Tensor:
        return Tensor(case.kind, produced)

    def consume(tensor: Tensor) -> Tensor:
        seen_at.append(address(np.asarray(tensor.array)))
        return tensor

    pipeline = StagePipeline([("producer", Stage("producer", Tensor, Tensor, produce)),
                              ("consumer", Stage("consumer", Tensor, Tensor, consume))],
                             observe=handoffs.append)
    seed = Tensor("seed", produced)
    for index in range(case.warmup + case.reps):
        if index == case.warmup:
            handoffs.clear()
            started = time.perf_counter()
        pipeline.run(seed)
    elapsed = time.perf_counter() - started
    copied = 0 if all(seen == produced_at for seen in seen_at) else case.nbytes
    return {**summary([h.seconds for h in handoffs], elapsed), "bytes_copied": copied}


def pickle_echo(inbox: multiprocessing.Queue, outbox: multiprocessing.Queue) -> None:
    """The pickle baseline's child: acks each (seq, sent_ns, payload) with its latency."""
    while (message := inbox.get()) is not None:
        seq, sent_ns, _payload = message
        received_ns = time.monotonic_ns()
        outbox.put((seq, received_ns - sent_ns))


class PickleQueue:
    """A spawned child process fed through a multiprocessing.Queue."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.inbox, self.outbox = context.Queue(), context.Queue()
        self.child = context.Process(target=pickle_echo, args=(self.inbox, self.outbox))
        self.child.start()

    def measure(self, case: Case) -> dict:
        payload = build_payload(case)
        latencies = []
        for seq in range(case.warmup + case.reps):
            if seq == case.warmup:
                latencies, started = [], time.perf_counter()
            self.inbox.put((seq, time.monotonic_ns(), payload))
            acked, latency_ns = self.outbox.get(timeout=60)
            assert acked == seq
            latencies.append(latency_ns / 1e9)
        return summary(latencies, time.perf_counter() - started)

    def close(self) -> None:
        self.inbox.put(None)
        self.child.join(timeout=30)


def measure_dora(flow: Path, cases: list[Case]) -> list[dict]:
    """Every case through one `dora run` of ``flow``; a case dora refused keeps its error."""
    with tempfile.TemporaryDirectory(prefix="transport-") as work:
        result = Path(work) / "result.json"
        env = dora_env({"TRANSPORT_RESULT": result,
                        "TRANSPORT_PLAN": json.dumps([{**asdict(case), "label": case.label}
                                                      for case in cases])})
        with DoraRun(flow, env, cwd=work, log=Path(work) / "dora.log") as graph:
            if graph.wait(DORA_TIMEOUT_S) or not result.exists():
                raise RuntimeError(f"`dora run {flow.name}` failed:\n{graph.log_text()[-3000:]}")
        records = json.loads(result.read_text())
    return [{"error": r["error"]} if "error" in r else
            summary([ns / 1e9 for ns in r["latencies_ns"]], r["elapsed_s"]) for r in records]


def measure_all(cases: list[Case]) -> dict[str, list[dict]]:
    """Each path over every case (path -> one figure per case)."""
    figures = {}
    print("memcpy ...", flush=True)
    figures["memcpy"] = [measure_memcpy(case) for case in cases]
    print("fused ...", flush=True)
    figures["fused"] = [measure_fused(case) for case in cases]
    print("pickle queue ...", flush=True)
    queue = PickleQueue()
    try:
        figures["pickle queue"] = [queue.measure(case) for case in cases]
    finally:
        queue.close()
    for path, flow in DORA_FLOWS.items():
        print(f"{path} ...", flush=True)
        figures[path] = measure_dora(flow, cases)
    return figures


# --- the report ------------------------------------------------------------------------------

def readable_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def readable_bytes(nbytes: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.4g} {unit}"
    return f"{nbytes} B"


def short_error(error: str) -> str:
    """dora's message without the output's name and the parenthesised list of reasons."""
    return error.split('": ', 1)[-1].split(" (")[0]


def print_table(cases: list[Case], figures: dict[str, list[dict]]) -> None:
    header = (f"{'size':>6}  {'payload':14} {'shape':16} {'path':13} {'median':>10} {'p99':>10} "
              f"{'messages/s':>11}  note")
    print()
    print_header(header)
    for index, case in enumerate(cases):
        if index and case.size != cases[index - 1].size:
            print()
        for path in PATHS:
            figure = figures[path][index]
            first = path == PATHS[0]
            lead = (f"{case.size:>6}  {case.kind:14} {'x'.join(map(str, case.shape)):16}"
                    if first else " " * 40)
            if "error" in figure:
                print(f"{lead} {path:13} {'fails':>10} {'fails':>10} {'-':>11}  "
                      f"{short_error(figure['error'])}")
                continue
            note = f"  {figure['bytes_copied']} bytes copied" if path == "fused" else ""
            print(f"{lead} {path:13} {readable_time(figure['median_s']):>10} "
                  f"{readable_time(figure['p99_s']):>10} {figure['messages_per_s']:>11,.0f}{note}")


def ratio(numerator: dict, denominator: dict) -> float | None:
    if "error" in numerator or "error" in denominator:
        return None
    return numerator["median_s"] / denominator["median_s"]


def goals(cases: list[Case], figures: dict[str, list[dict]]) -> dict:
    """The issue's goals, from the medians (the 16 MiB ones per payload kind)."""
    fused = figures["fused"]
    result = {"fused": {"bytes_copied": sum(f["bytes_copied"] for f in fused),
                        "max_median_s": max(f["median_s"] for f in fused)}}
    result["fused"]["met"] = (result["fused"]["bytes_copied"] == 0
                              and result["fused"]["max_median_s"] <= 50e-6)
    for index, case in enumerate(cases):
        if case.size != GOAL_SIZE:
            continue
        tuned = figures["dora tuned"][index]
        vs_memcpy = ratio(tuned, figures["memcpy"][index])
        pickle_vs = ratio(figures["pickle queue"][index], tuned)
        result[case.label] = {
            "dora_tuned_over_memcpy": vs_memcpy,
            "dora_tuned_over_memcpy_met": vs_memcpy is not None and vs_memcpy <= 2,
            "pickle_over_dora_tuned": pickle_vs,
            "pickle_over_dora_tuned_met": pickle_vs is not None and pickle_vs >= 10}
    return result


def print_goals(result: dict) -> None:
    def verdict(met: bool) -> str:
        return "met" if met else "NOT met"

    def times(value: float | None) -> str:
        return "fails" if value is None else f"{value:.2f}x"

    print()
    for label, figure in result.items():
        if label == "fused":
            continue
        print(f"{label}: dora tuned / memcpy = {times(figure['dora_tuned_over_memcpy'])} "
              f"(goal <= 2x) {verdict(figure['dora_tuned_over_memcpy_met'])}")
        print(f"{label}: pickle / dora tuned = {times(figure['pickle_over_dora_tuned'])} "
              f"(goal >= 10x) {verdict(figure['pickle_over_dora_tuned_met'])}")
    fused = result["fused"]
    copied = ("0 bytes copied at every size" if fused["bytes_copied"] == 0
              else f"{readable_bytes(fused['bytes_copied'])} copied")
    print(f"fused: {copied}, max median {fused['max_median_s'] * 1e6:.1f} us "
          f"(goal 0 bytes, <= 50 us) {verdict(fused['met'])}")


def plot(cases: list[Case], figures: dict[str, list[dict]], path: Path) -> None:
    """Median latency against payload size, one panel per payload kind; failures marked."""
    plt = pyplot()
    kinds = list(dict.fromkeys(case.kind for case in cases))
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), sharey=True,
                             squeeze=False)
    for axis, kind in zip(axes[0], kinds):
        indices = [i for i, case in enumerate(cases) if case.kind == kind]
        for name in PATHS:
            done = [i for i in indices if "error" not in figures[name][i]]
            line, = axis.plot([SIZES[cases[i].size] for i in done],
                              [figures[name][i]["median_s"] for i in done], marker="o", label=name)
            for i in indices:
                if "error" in figures[name][i]:  # low in the panel, where no line passes
                    where = (SIZES[cases[i].size], 0.3)
                    axis.plot(*where, marker="x", markersize=12, color=line.get_color(),
                              transform=axis.get_xaxis_transform())
                    axis.annotate(f"{name}\nfails", where, xytext=(6, 12), va="bottom",
                                  textcoords="offset points", ha="right", fontsize=9,
                                  color=line.get_color(), xycoords=axis.get_xaxis_transform())
        axis.set_xscale("log", base=2)
        axis.set_xticks([SIZES[cases[i].size] for i in indices],
                        [cases[i].size for i in indices], rotation=30)
        axis.set_yscale("log")
        axis.set_title(kind)
        axis.set_xlabel("payload size")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("one-way latency, median (s)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Handing a payload on: fused, dora, pickle queue, memcpy")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="3 sizes, fewer messages")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES))
    add_output_flags(parser, "transport.json", "transport.png")
    args = parser.parse_args()

    sizes = args.sizes or (QUICK_SIZES if args.quick else list(SIZES))
    cases = plan(sorted(sizes, key=SIZES.get), args.quick)
    figures = measure_all(cases)
    print_table(cases, figures)
    result = goals(cases, figures)
    print_goals(result)
    write_json(args.json, {
        "machine": machine(dora=version("dora-rs"), numpy=np.__version__,
                           pyarrow=version("pyarrow"), mlx=version("mlx")),
        "cases": [{**asdict(case), "bytes": case.nbytes,
                   "paths": {path: figures[path][index] for path in PATHS}}
                  for index, case in enumerate(cases)],
        "goals": result}, indent=2)
    plot(cases, figures, args.png)
    print(f"\nwrote {args.json} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
