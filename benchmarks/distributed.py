"""The voice agent over two machines against the same graph on one, in one run: per-hop latency
and a turn's time.

    python benchmarks/distributed.py [--runs N] [--json FILE]

(Run it with the project's environment first on PATH: the nodes are its console scripts.)

A coordinator and two daemons, machines A and B, on loopback ports of their own
(mofa_omni.cluster.local: the processes a user starts on two machines). Two placements of
dataflows/voice.split.yml on that same cluster, alternated ``--runs`` times each (default 2):

  split   as written: VAD, whisper, dialogue and sink on A; LLM, splitter and TTS on B. The
          chat request, the LLM's text and the spoken sentences cross between the daemons
          (dora's daemon path, no shared memory between machines)
  one     every node on A (the same file with each ``deploy: machine`` set to A): shared memory

Each run plays the checkout's two sample questions (dataflows/samples) in real time; the nodes
write a timing trace (MOFA_OMNI_TRACE, see mofa_omni.node.trace). A hop's latency is, for every
message a node received, its receive time minus the sender's send stamp (sent_ns), per edge of
the graph (sender/output -> receiver/input): Arrow encoding, dora's transport and the wait in
the receiver's queue. The edges that cross machines in the split placement are marked ``*``. A turn's time is measured as in benchmarks/voice_latency.py: from the end of the user's
speech to the sink receiving the reply's last audio chunk (TTFA: its first chunk). Both
machines are this machine, so the figures show what dora's cross-daemon path costs, not a real
network's latency; with real machines, add the network's round trips to the marked hops (and
their clocks must agree for this trace's hop figures).

Prints a table (medians; ratio split/one) and writes benchmarks/results/distributed.json (or
--json FILE). About 3 minutes on a 2-core machine with --runs 2.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import yaml

from mofa_omni.cluster.local import LocalCluster
from mofa_omni.node import trace

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, add_output_flags, make_parser, median, write_json  # noqa: E402
from voice_latency import analyse  # noqa: E402

SPLIT = ROOT / "dataflows" / "voice.split.yml"
# llm/result goes to both the splitter (beside the LLM on B) and the dialogue (on A).
HOPS = [("vad/utterance", "asr"), ("asr/result", "dialogue"), ("dialogue/chat", "llm"),
        ("llm/result", "splitter"), ("llm/result", "dialogue"), ("splitter/speech", "tts"),
        ("tts/result", "sink"), ("sink/done", "dialogue")]


# A turn's figures (benchmarks/voice_latency.py): where the time went, then the totals.
STAGES = [("endpoint_s", "endpoint (VAD's silence wait)"), ("asr_s", "ASR compute"),
          ("llm_s", "LLM compute"), ("tts_first_chunk_s", "TTS compute, 1st sentence"),
          ("ttfa_s", "time to first audio"), ("turn_s", "turn (end of speech -> last audio)")]


def placements(folder: Path) -> dict[str, Path]:
    """The split dataflow as written, and the same with every node on machine A."""
    descriptor = yaml.safe_load(SPLIT.read_text())
    for node in descriptor["nodes"]:
        node["deploy"] = {"machine": "A"}
    one = folder / "voice.one.yml"
    one.write_text(yaml.safe_dump(descriptor, sort_keys=False))
    return {"split": SPLIT, "one": one}


def crossing(dataflow: Path) -> set[tuple[str, str]]:
    """The hops whose sender and receiver run on different machines."""
    descriptor = yaml.safe_load(dataflow.read_text())
    machine = {n["id"]: (n.get("deploy") or {}).get("machine", "") for n in descriptor["nodes"]}
    return {(source, receiver) for source, receiver in HOPS
            if machine[source.split("/")[0]] != machine[receiver]}


def edges(dataflow: Path) -> dict[tuple[str, str], str]:
    """(receiver, input id) -> its source "node/output", for the hops measured."""
    descriptor = yaml.safe_load(dataflow.read_text())
    wanted, found = set(HOPS), {}
    for node in descriptor["nodes"]:
        for input_id, spec in (node.get("inputs") or {}).items():
            source = spec["source"] if isinstance(spec, dict) else spec
            if (source, node["id"]) in wanted:
                found[(node["id"], input_id)] = source
    return found


def hop_latencies(records: list[dict], dataflow: Path) -> dict[str, list[float]]:
    """Seconds from send stamp to receipt, per hop "sender/output -> receiver"."""
    by_input = edges(dataflow)
    hops: dict[str, list[float]] = {f"{s} -> {r}": [] for s, r in HOPS}
    for r in records:
        if r["event"] != "recv" or not r.get("sent_ns"):
            continue
        source = by_input.get((r["node"], r["port"]))
        if source:
            hops[f"{source} -> {r['node']}"].append((r["now_ns"] - r["sent_ns"]) / 1e9)
    return hops


def run_once(cluster: LocalCluster, dataflow: Path, folder: Path, timeout: float) -> dict:
    folder.mkdir(parents=True)
    trace_file = folder / "trace.jsonl"
    started = time.monotonic()
    flow = cluster.start(dataflow, env={"VOICE_OUTPUT": str(folder / "out"),
                                        trace.TRACE_ENV: str(trace_file)})
    status = cluster.wait_finished(flow, timeout)
    if status != "Finished":
        raise RuntimeError(f"{dataflow.name}: the dataflow ended {status}")
    records = trace.read(trace_file)
    turns = analyse(records)
    transcript = (folder / "out" / "transcript.txt").read_text().splitlines()
    return {"seconds": time.monotonic() - started, "turns": turns, "transcript": transcript,
            "hops": hop_latencies(records, dataflow)}


def summarise(runs: list[dict]) -> dict:
    hops: dict[str, list[float]] = {}
    for run in runs:
        for hop, values in run["hops"].items():
            hops.setdefault(hop, []).extend(values)
    turns = [t for run in runs for t in run["turns"]]
    return {"hops_s": {hop: median(v, empty=None) for hop, v in hops.items()},
            "hop_messages": {hop: len(v) for hop, v in hops.items()},
            **{key: median([t[key] for t in turns], empty=None) for key, _ in STAGES},
            "turns": len(turns)}


def ms(value: float | None) -> str:
    return f"{value * 1e3:9.1f}" if value is not None else f"{'-':>9}"


def print_table(result: dict, crossed: set[tuple[str, str]]) -> None:
    split, one = result["split"], result["one"]
    print(f"\n{'hop (median)':38} {'one ms':>9} {'split ms':>9} {'split/one':>9} {'msgs':>6}")
    for source, receiver in HOPS:
        hop = f"{source} -> {receiver}"
        a, b = one["hops_s"][hop], split["hops_s"][hop]
        ratio = f"{b / a:9.2f}" if a and b else f"{'-':>9}"
        mark = "*" if (source, receiver) in crossed else " "
        print(f"{mark}{hop:37} {ms(a)} {ms(b)} {ratio} {split['hop_messages'][hop]:6}")
    for key, name in STAGES:
        a, b = one[key], split[key]
        ratio = f"{b / a:9.2f}" if a and b else f"{'-':>9}"
        print(f" {name:37} {ms(a)} {ms(b)} {ratio}")
    print(f"(* crosses machines in the split placement; {split['turns']} turns split, "
          f"{one['turns']} on one machine)")


def main() -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--runs", type=int, default=2, help="runs of each placement")
    add_output_flags(parser, "distributed.json")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="omni-distributed-") as tmp:
        folder = Path(tmp)
        flows = placements(folder)
        runs: dict[str, list[dict]] = {"split": [], "one": []}
        with LocalCluster(["A", "B"], folder / "cluster") as cluster:
            for index in range(args.runs):
                for name, dataflow in flows.items():  # alternated: the machine's load evens out
                    run = run_once(cluster, dataflow, folder / f"{name}-{index}", args.timeout)
                    print(f"{name} run {index + 1}: {len(run['turns'])} turns in "
                          f"{run['seconds']:.1f} s: {' | '.join(run['transcript'])}",
                          file=sys.stderr)
                    runs[name].append(run)
        result = {name: summarise(r) for name, r in runs.items()}
        result["crossing"] = [f"{s} -> {r}" for s, r in sorted(crossing(SPLIT))]
        result["runs"] = args.runs
        result["transcripts"] = {name: [r["transcript"] for r in rs] for name, rs in runs.items()}
    print_table(result, crossing(SPLIT))
    write_json(args.json, result)
    print(f"figures: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
