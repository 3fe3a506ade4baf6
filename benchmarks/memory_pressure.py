"""The memory scheduler under pressure: a voice agent plus an embedder in about half the memory.

    python benchmarks/memory_pressure.py [--json FILE] [--png FILE] [--fraction F | --budget SIZE]
                                         [--only scheduler|unscheduled] [--gap S] [--timeout S]
                                         [--keep DIR] [--replot JSON]

(Run it with the project's environment first on PATH: dora starts `.py` nodes with `python`.)

The workload is benchmarks/dataflows/memory_pressure.yml: the voice agent of dataflows/voice.yml
(wav_source -> Silero VAD -> whisper -> dialogue -> LLM -> sentence splitter -> Piper -> wav_sink)
with its model nodes asking for larger models than the defaults -- whisper-base, gemma-3-270m,
piper-joe -- and a MiniLM embedding node (minilm-l6) fed by its own driver
(benchmarks/dataflows/embed_driver.py), which embeds fixed sentences at start, each user line while
the agent answers it, and each reply a few seconds after it was written. The agent hears four turns
made from dataflows/samples, the 2nd and 4th after --gap seconds of silence (default 10), so that
the voice pipeline goes idle (the scheduler's ACTIVE_S is 3 s) and the embedder competes with it
both while it is idle and while it is busy. In all: 4 voice turns and 9 embedding requests.

"What all models need" is each model's estimate on the backend serving it here, as the scheduler
plans (the catalog's figure for that backend, runtime/models/catalog.toml memory_mb, or the
adapter's estimate from the prepared files: mofa_omni.models.footprint) plus a process overhead
each (mofa_omni.scheduler.bookkeeping.DEFAULT_OVERHEAD, 200 MiB); BUDGET is --fraction of it (default 0.5), raised if needed so that the smallest rung
of every node's size ladder (whisper-tiny.en, smollm2-135m-q4, piper-joe, minilm-l6) fits with the
overheads: every request can then be served. The same workload runs twice in one invocation:

  scheduler     the graph as it is: the scheduler grants each load within BUDGET, evicts idle
                models outside the active pipeline, steps models down their ladders
                (gemma-3-270m -> smollm2-135m -> smollm2-135m-q4, whisper-base -> whisper-tiny.en)
                and back up, and makes loads wait
  no scheduler  the same graph without the scheduler node (no `scheduler` inputs, no `memory`
                outputs): every model node loads the model it asks for on its own

Measured for each, from this process: the resident memory (RSS) of the model-node processes
(omni_node.py below this run's `dora run`), summed, every 25 ms (the process list is rescanned
every 0.5 s) -- its peak, peak / budget, and the seconds spent over the budget; requests sent,
completed and failed (voice turns from the dialogue's transcript: a reply without an error mark
is completed; embeddings from the driver's report: vectors or an ErrorReport); load times (the
nodes' "loaded X on BACKEND in Y s" log lines: first loads, reloads after an eviction, and variant switches);
wall time. With the scheduler, its JOURNAL (every policy event with the decisions it led to,
replayed here through the pure policy as a check) gives the decisions: grants, evictions,
step-downs (a grant of a smaller variant than asked, or a switch down), step-ups, waits and
refusals. Event times are time.monotonic() of the scheduler process, which on Linux is the same
clock as this process's, so decisions are placed on the memory curve.

Prints a table, writes benchmarks/results/memory_pressure.json (or --json FILE) and a PNG of
memory over time for both runs -- per node, stacked, with the budget line and each decision
marked -- at benchmarks/results/memory_pressure.png (or --png FILE). Every process a run starts is
ended when it finishes, fails or times out. About 4 minutes on a 2-core machine.

Goals, with the scheduler: every request completes, and the peak stays within 5 % of the budget
(the scheduler reserves each load's measured peak, but a model's working set still grows while
it serves -- whisper's decoding, Piper's synthesis -- and memory is sampled here far more often
than the nodes report it). The exit status is 1 when a request failed in either run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec
import numpy as np
import psutil
import yaml
from common import (
    FLOWS,
    SAMPLES,
    DoraRun,
    add_output_flags,
    descendants,
    dora_env,
    make_parser,
    pyplot,
    run_stamp,
    save_figure,
    write_json,
)

from mofa_omni.adapters.loading import open_model
from mofa_omni.media.audio import read_wav, write_wav
from mofa_omni.models.catalog import Catalog
from mofa_omni.models.memory import format_bytes, parse_size
from mofa_omni.models.store import ModelStore
from mofa_omni.node.residency import estimated_bytes
from mofa_omni.scheduler.bookkeeping import DEFAULT_OVERHEAD, replay
from mofa_omni.scheduler.messages import COMMAND_OUTPUT, MEMORY_OUTPUT, SCHEDULER_INPUT

DATAFLOW = FLOWS / "memory_pressure.yml"
SCHEDULER = "scheduler"
MiB = 1 << 20
VARIANTS = ("scheduler", "no scheduler")


# --- the workload ------------------------------------------------------------------------------

def model_nodes(descriptor: dict) -> dict[str, str]:
    """The graph's model nodes and the model each asks for."""
    return {n["id"]: (n.get("env") or {})["MODEL"] for n in descriptor["nodes"]
            if str(n.get("path", "")).endswith("omni_node.py")}


def budget_plan(catalog: Catalog, models: dict[str, str], fraction: float,
                budget: int | None) -> dict:
    """What all models need (each one's estimate on the backend serving it here, as the
    scheduler plans, + a process overhead each), the least that serves every request (every
    node at its smallest rung), and the budget."""
    store = ModelStore()

    def size(model: str) -> int:
        return estimated_bytes(catalog.get(model), store)

    need = {node: size(model) + DEFAULT_OVERHEAD for node, model in models.items()}
    smallest = {}
    for node, model in models.items():
        name = min([model, *catalog.smaller_than(model)], key=size)
        smallest[node] = (name, size(name) + DEFAULT_OVERHEAD)
    floor = sum(size for _, size in smallest.values())
    chosen = budget if budget is not None else max(int(fraction * sum(need.values())), floor)
    return {"need_bytes": sum(need.values()), "need_per_node": need,
            "smallest": {n: m for n, (m, _) in smallest.items()}, "floor_bytes": floor,
            "budget_bytes": chosen, "fraction": chosen / sum(need.values()),
            "overhead_bytes": DEFAULT_OVERHEAD}


def make_turns(folder: Path, gap_s: float) -> list[dict]:
    """Four turns from dataflows/samples; the 2nd and 4th come after ``gap_s`` of silence."""
    folder.mkdir(parents=True, exist_ok=True)
    wavs = sorted(SAMPLES.glob("*.wav"))
    turns = []
    for i in range(4):
        audio, rate = read_wav(wavs[i % len(wavs)])
        silence = gap_s if i % 2 else 0.0
        audio = np.concatenate([np.zeros(round(silence * rate), np.float32), audio])
        write_wav(folder / f"{i + 1:02d}.wav", audio, rate)
        turns.append({"wav": wavs[i % len(wavs)].name, "silence_before_s": silence})
    return turns


def variant_dataflow(scheduled: bool, folder: Path) -> Path:
    """The benchmark's graph, with or without the scheduler, written into ``folder`` with
    absolute node paths (so that dora's logs go there too)."""
    descriptor = yaml.safe_load(DATAFLOW.read_text())
    nodes = []
    for node in descriptor["nodes"]:
        node = dict(node)
        if node.get("path") not in (None, "dynamic"):
            node["path"] = str((DATAFLOW.parent / node["path"]).resolve())
        if not scheduled:
            if node["id"] == SCHEDULER or node.get("path") == "dynamic":
                continue
            node["inputs"] = {k: v for k, v in (node.get("inputs") or {}).items()
                              if k != SCHEDULER_INPUT and v != f"{SCHEDULER}/{COMMAND_OUTPUT}"}
            node["outputs"] = [o for o in node.get("outputs") or [] if o != MEMORY_OUTPUT]
        nodes.append(node)
    path = folder / ("scheduled.yml" if scheduled else "unscheduled.yml")
    path.write_text(yaml.safe_dump({**descriptor, "nodes": nodes}, sort_keys=False))
    return path


# --- running one variant -----------------------------------------------------------------------

class ProcessWatch(threading.Thread):
    """Samples the summed RSS of the model-node processes below ``root`` every ``every_s``;
    rescans the process tree every ``rescan_s`` (new processes)."""

    def __init__(self, root: int, every_s: float = 0.025, rescan_s: float = 0.5):
        super().__init__(daemon=True)
        self.root, self.every_s, self.rescan_s = root, every_s, rescan_s
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.seen: dict[int, psutil.Process] = {}
        self.models: dict[int, tuple[psutil.Process, str]] = {}  # pid -> (process, node id)
        self.dialogue: psutil.Process | None = None
        self._halt = threading.Event()

    def _rescan(self) -> None:
        for child in descendants(self.root):
            if child.pid in self.seen:
                continue
            self.seen[child.pid] = child
            try:
                cmdline = " ".join(child.cmdline())
                if "omni_node.py" in cmdline:
                    config = child.environ().get("DORA_NODE_CONFIG", "")
                    match = re.search(r"^node_id:\s*(\S+)", config, re.MULTILINE)
                    self.models[child.pid] = (child, match.group(1) if match else str(child.pid))
                elif "dialogue.py" in cmdline:
                    self.dialogue = child
            except psutil.Error:
                pass

    def run(self) -> None:
        last_scan = 0.0
        while not self._halt.wait(self.every_s):
            now = time.monotonic()
            if now - last_scan >= self.rescan_s:
                self._rescan()
                last_scan = now
            parts: dict[str, int] = {}
            for pid, (process, node) in list(self.models.items()):
                try:
                    parts[node] = parts.get(node, 0) + process.memory_info().rss
                except psutil.Error:
                    del self.models[pid]
            self.samples.append((now, parts))

    def dialogue_ended(self) -> bool:
        return self.dialogue is not None and not self.dialogue.is_running()

    def stop(self) -> None:
        self._halt.set()
        self.join()


def run_variant(name: str, dataflow: Path, env: dict[str, str], work: Path,
                timeout: float) -> dict:
    """``dora run`` one variant while sampling its model processes' memory; ends every process
    it started, whatever happens."""
    log_path = work / "dora.log"
    started = time.monotonic()
    stopping = None
    timed_out = False
    # each node chooses its own BLAS set-up, as from a shell; on leaving, whatever happened,
    # `dora run` gets 5 s after its SIGINT, then every process it started is ended
    with DoraRun(dataflow, dora_env(env, own_blas=True), cwd=work, log=log_path,
                 grace_s=5) as graph:
        watch = ProcessWatch(graph.pid)
        watch.start()
        try:
            while graph.running:
                now = time.monotonic()
                if watch.dialogue_ended() and not (work / "voice-ended").exists():
                    (work / "voice-ended").touch()  # the embedding driver may finish now
                if stopping is None and now - started > timeout:
                    print(f"  {name}: still running after {timeout:g} s: stopping it",
                          file=sys.stderr)
                    timed_out, stopping = True, now
                    graph.interrupt()  # as Ctrl-C: a Stop to every node
                elif stopping is not None and now - stopping > 30:
                    break
                time.sleep(0.2)
        finally:
            ended = time.monotonic()
            watch.stop()
    if graph.leftovers:
        print(f"  {name}: ended {len(graph.leftovers)} process(es) still running",
              file=sys.stderr)
    return {"started": started, "wall_s": ended - started, "dora_status": graph.returncode,
            "timed_out": timed_out, "samples": watch.samples, "log": log_path}


# --- reading what a run left -------------------------------------------------------------------

def node_logs(work: Path) -> dict[str, list[dict]]:
    """dora's per-node logs of the run (``out/<uuid>/log_<node>.jsonl`` beside the dataflow)."""
    logs: dict[str, list[dict]] = {}
    for path in sorted(work.glob("out/*/log_*.jsonl")):
        node = path.stem.removeprefix("log_")
        for line in path.read_text(errors="replace").splitlines():
            try:
                logs.setdefault(node, []).append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return logs


def load_events(logs: dict[str, list[dict]], models: dict[str, str]) -> list[dict]:
    """Each model load in the nodes' logs: a first load, a reload (after an eviction), or a
    switch to another variant (the node's last scheduler command was `switch`)."""
    loaded = re.compile(r"loaded (\S+) on \S+ in ([\d.]+) s \(\+(\d+) MiB, peak \+(\d+) MiB\)")
    command = re.compile(r"mofa_omni\.serving: scheduler: (\w+)")
    events = []
    for node in models:
        loaded_before, action = False, ""
        for entry in logs.get(node, []):
            msg = str(entry.get("msg", ""))
            if match := command.search(msg):
                action = match[1]
            elif match := loaded.search(msg):
                kind = "switch" if action == "switch" else "reload" if loaded_before else "load"
                events.append({"node": node, "model": match[1], "seconds": float(match[2]),
                               "grew_mib": int(match[3]), "peak_mib": int(match[4]),
                               "kind": kind, "ts": entry.get("ts")})
                loaded_before = True
    return events


def node_errors(logs: dict[str, list[dict]], models: dict[str, str]) -> list[str]:
    """Requests a model node answered with an error (the host logs each one)."""
    return [f"{node}: {entry['msg']}" for node in models for entry in logs.get(node, [])
            if re.search(r"mofa_omni\.host: request \S+:", str(entry.get("msg", "")))]


def voice_outcome(output: Path, turns: int) -> dict:
    lines = (output / "transcript.txt").read_text().splitlines() \
        if (output / "transcript.txt").exists() else []
    replies = [line.partition(": ")[2] for line in lines if line.startswith("assistant: ")]
    completed = sum(1 for r in replies if r.strip() and "[error" not in r
                    and "[interrupted]" not in r)
    return {"sent": turns, "completed": completed, "failed": turns - completed,
            "transcript": lines, "reply_wavs": len(list(output.glob("reply-*.wav")))}


def embed_outcome(work: Path) -> dict:
    path = work / "embed.json"
    if not path.exists():
        return {"sent": 0, "completed": 0, "failed": 0, "report_missing": True, "requests": {}}
    report = json.loads(path.read_text())
    requests = report["requests"]
    completed = sum(1 for r in requests.values() if "vectors" in r)
    return {"sent": len(requests), "completed": completed, "failed": len(requests) - completed,
            "timed_out": report.get("timed_out", False), "requests": requests}


def journal_decisions(path: Path) -> tuple[list[dict], list[dict], int, int, float | None]:
    """The journal's decisions and Loaded events (with their times), how many of its events
    the pure policy, replayed, decides differently, the most memory the policy counted as used
    (reserved loads, measured working sets and process overheads) at any point, and when the
    first model node left (the graph winding down), if one did."""
    if not path.exists():
        return [], [], 0, 0, None
    lines = path.read_bytes().splitlines()
    mismatches = accounted = 0
    for recorded, replayed, used in replay(lines):
        mismatches += recorded != replayed
        accounted = max(accounted, used)
    decisions, loaded, first_left = [], [], None
    for line in lines[1:]:
        entry = msgspec.json.decode(line)
        now = entry["fields"]["now"]
        if entry["event"] == "Departed":
            first_left = now if first_left is None else first_left  # its process ended
        if entry["event"] == "Loaded":
            loaded.append({**entry["fields"], "at": now})
        for d in entry["decisions"]:
            f = d["fields"]
            decisions.append({"at": now, "type": d["type"], "node": f["node"],
                              "model": f.get("model", ""), "reason": f.get("reason", ""),
                              "event": entry["event"]})
    return decisions, loaded, mismatches, accounted, first_left


def decision_counts(decisions: list[dict], winding_down_s: float | None) -> dict:
    grants_down = [d for d in decisions if d["type"] == "Grant" and "stepped down" in d["reason"]]
    switches_down = [d for d in decisions if d["type"] == "Switch" and "steps down" in d["reason"]]
    return {"grants": sum(d["type"] == "Grant" for d in decisions),
            "evictions": sum(d["type"] == "Evict" for d in decisions),
            "step_downs": len(grants_down) + len(switches_down),
            "step_downs_at_grant": len(grants_down), "step_downs_by_switch": len(switches_down),
            "step_ups": sum(d["type"] == "Switch" and "steps up" in d["reason"]
                            for d in decisions),
            "step_ups_winding_down": sum(
                d["type"] == "Switch" and "steps up" in d["reason"] and
                winding_down_s is not None and d["at_s"] >= winding_down_s for d in decisions),
            "waits": sum(d["type"] == "Wait" for d in decisions),
            "refusals": sum(d["type"] == "Refuse" for d in decisions)}


def memory_figures(samples: list[tuple[float, dict[str, int]]], budget: int,
                   started: float) -> dict:
    if not samples:
        return {"peak_bytes": 0, "peak_parts": {}, "peak_at_s": None, "over_budget_s": 0.0}
    totals = [sum(parts.values()) for _, parts in samples]
    peak_index = int(np.argmax(totals))
    over = sum(b[0] - a[0] for a, b, total in zip(samples, samples[1:], totals)
               if total > budget)
    return {"peak_bytes": totals[peak_index], "peak_parts": samples[peak_index][1],
            "peak_at_s": samples[peak_index][0] - started, "over_budget_s": over,
            "samples": len(samples),
            "mean_interval_ms": 1000 * (samples[-1][0] - samples[0][0]) / max(len(samples) - 1, 1)}


def run_one(name: str, plan: dict, models: dict[str, str], turns: list[dict], inputs: Path,
            work: Path, timeout: float) -> dict:
    scheduled = name == "scheduler"
    work.mkdir(parents=True)
    output = work / "voice"
    env = {"VOICE_INPUT": str(inputs), "VOICE_OUTPUT": str(output), "WORK": str(work),
           "TURNS": str(len(turns))}
    if scheduled:
        env.update(BUDGET=str(plan["budget_bytes"]), JOURNAL=str(work / "journal.jsonl"),
                   STATUS_FILE=str(work / "status.json"))
    how = f"budget {format_bytes(plan['budget_bytes'])}" if scheduled else \
        "every node loads on its own"
    print(f"{name}: dora run ({how}) ...", file=sys.stderr, flush=True)
    run = run_variant(name, variant_dataflow(scheduled, work), env, work, timeout)
    logs = node_logs(work)
    voice, embeds = voice_outcome(output, len(turns)), embed_outcome(work)
    loads = load_events(logs, models)
    result = {
        "variant": name, "wall_s": run["wall_s"], "dora_status": run["dora_status"],
        "timed_out": run["timed_out"], "budget_bytes": plan["budget_bytes"],
        "voice": voice, "embeddings": embeds,
        "requests": {k: voice[k] + embeds[k] for k in ("sent", "completed", "failed")},
        **memory_figures(run["samples"], plan["budget_bytes"], run["started"]),
        "loads": loads, "node_errors": node_errors(logs, models),
        "series": [(round(t - run["started"], 3), parts) for t, parts in run["samples"]],
    }
    result["peak_ratio"] = result["peak_bytes"] / plan["budget_bytes"]
    if scheduled:
        decisions, loaded, mismatches, accounted, first_left = \
            journal_decisions(work / "journal.jsonl")
        for d in decisions:
            d["at_s"] = d.pop("at") - run["started"]
        winding_down = first_left - run["started"] if first_left is not None else None
        result.update(decisions=decisions, counts=decision_counts(decisions, winding_down),
                      winding_down_at_s=winding_down,
                      replay_mismatches=mismatches, accounted_peak_bytes=accounted,
                      journal_loads=[{"node": e["node"], "model": e["model"],
                                      "seconds": e["seconds"], "at_s": e["at"] - run["started"]}
                                     for e in loaded])
        status = work / "status.json"
        if status.exists():
            shown = json.loads(status.read_text())
            result["scheduler_peak_measured_bytes"] = shown.get("peak_measured")
    embed_sent = [r["sent"] - run["started"] for r in embeds["requests"].values()]
    result["embed_sent_at_s"] = sorted(embed_sent)
    if run["dora_status"] != 0 or run["timed_out"]:
        print(f"  {name}: dora run exited with {run['dora_status']}"
              f"{' (timed out)' if run['timed_out'] else ''}; last lines of its output:\n"
              + run["log"].read_text(errors="replace")[-2500:], file=sys.stderr)
    return result


# --- output ------------------------------------------------------------------------------------

def _times(loads: list[dict], kinds: tuple[str, ...]) -> str:
    seconds = [load["seconds"] for load in loads if load["kind"] in kinds]
    if not seconds:
        return "-"
    return f"{statistics.mean(seconds):.2f} / {max(seconds):.2f} ({len(seconds)})"


def table_rows(results: dict[str, dict], plan: dict) -> list[tuple[str, ...]]:
    def each(fn) -> tuple[str, ...]:
        return tuple(fn(results[v]) if v in results else "(not run)" for v in VARIANTS)

    def counts(key: str):
        return lambda r: str(r["counts"][key]) if "counts" in r else "-"

    return [
        ("voice turns completed / sent", *each(
            lambda r: f"{r['voice']['completed']} / {r['voice']['sent']}")),
        ("embeddings completed / sent", *each(
            lambda r: f"{r['embeddings']['completed']} / {r['embeddings']['sent']}")),
        ("requests failed", *each(lambda r: str(r["requests"]["failed"]))),
        ("errors logged by model nodes", *each(lambda r: str(len(r["node_errors"])))),
        ("budget (MiB)", *each(lambda r: f"{plan['budget_bytes'] / MiB:.0f}")),
        ("peak of the model processes (MiB)", *each(lambda r: f"{r['peak_bytes'] / MiB:.0f}")),
        ("peak / budget", *each(lambda r: f"{r['peak_ratio']:.3f}")),
        ("time over the budget (s)", *each(lambda r: f"{r['over_budget_s']:.1f}")),
        ("most the scheduler counted as used (MiB)", *each(
            lambda r: f"{r['accounted_peak_bytes'] / MiB:.0f}" if "counts" in r else "-")),
        ("grants", *each(counts("grants"))),
        ("evictions", *each(counts("evictions"))),
        ("step-downs (at grant + switch)", *each(
            lambda r: f"{r['counts']['step_downs']} ({r['counts']['step_downs_at_grant']} + "
                      f"{r['counts']['step_downs_by_switch']})" if "counts" in r else "-")),
        ("step-ups (of which while winding down)", *each(
            lambda r: f"{r['counts']['step_ups']} ({r['counts']['step_ups_winding_down']})"
            if "counts" in r else "-")),
        ("waits / refusals", *each(
            lambda r: f"{r['counts']['waits']} / {r['counts']['refusals']}"
            if "counts" in r else "-")),
        ("first load s, mean / max (n)", *each(lambda r: _times(r["loads"], ("load",)))),
        ("reload s, mean / max (n)", *each(lambda r: _times(r["loads"], ("reload",)))),
        ("switch s, mean / max (n)", *each(lambda r: _times(r["loads"], ("switch",)))),
        ("wall time (s)", *each(lambda r: f"{r['wall_s']:.1f}")),
    ]


def print_table(results: dict[str, dict], plan: dict) -> None:
    rows = table_rows(results, plan)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':{width}}  {VARIANTS[0]:>22}  {VARIANTS[1]:>22}")
    for label, *cells in rows:
        print(f"{label:{width}}  {cells[0]:>22}  {cells[1]:>22}")
    print(f"(the models asked for need {plan['need_bytes'] / MiB:.0f} MiB by the catalog's "
          f"estimates with {plan['overhead_bytes'] / MiB:.0f} MiB per process, every node at its "
          f"smallest variant {plan['floor_bytes'] / MiB:.0f} MiB; budget = "
          f"{plan['fraction']:.2f} of the first; memory = summed RSS of the omni_node "
          "processes; load times in seconds)")


MARKERS = {  # decision type -> (marker, colour, label)
    "Grant": ("^", "#2ca02c", "grant"),
    "Grant-down": ("^", "#ff7f0e", "grant of a smaller variant"),
    "Evict": ("X", "#d62728", "evict"),
    "Switch-down": ("v", "#ff7f0e", "step down (switch)"),
    "Switch-up": ("^", "#9467bd", "step up (switch)"),
    "Wait": ("o", "#7f7f7f", "wait"),
    "Refuse": ("s", "black", "refuse"),
}
NODE_COLOURS = {"asr": "#1f77b4", "llm": "#2ca02c", "tts": "#d62728", "embedder": "#9467bd"}


def _marker_kind(d: dict) -> str:
    if d["type"] == "Grant":
        return "Grant-down" if "stepped down" in d["reason"] else "Grant"
    if d["type"] == "Switch":
        return "Switch-down" if "steps down" in d["reason"] else "Switch-up"
    return d["type"]


def _decision_line(number: int, d: dict) -> str:
    kind = _marker_kind(d)
    action = {"Grant": "grant", "Grant-down": "grant", "Evict": "evict", "Switch-down": "down",
              "Switch-up": "up", "Wait": "wait", "Refuse": "REFUSE"}[kind]
    return f"{number:2d} {d['at_s']:6.1f}s {action:5} {d['node']} {d['model']}".rstrip()


def plot(path: Path, results: dict[str, dict], plan: dict, models: dict[str, str]) -> None:
    plt = pyplot()
    shown = [v for v in VARIANTS if v in results]
    fig, axes = plt.subplots(len(shown), 2, figsize=(14, 4.4 * len(shown) + 0.9), squeeze=False,
                             width_ratios=[3.4, 1.2], layout="constrained")
    budget_mib = plan["budget_bytes"] / MiB
    top = max(max(results[v]["peak_bytes"] for v in shown) / MiB, budget_mib) * 1.12
    handles: dict[str, object] = {}
    for (ax, side), variant in zip(axes, shown):
        r = results[variant]
        times = np.array([t for t, _ in r["series"]])
        nodes = list(models)
        stack = np.array([[parts.get(n, 0) / MiB for _, parts in r["series"]] for n in nodes])
        areas = ax.stackplot(times, stack, colors=[NODE_COLOURS.get(n) for n in nodes],
                             alpha=0.55)
        for node, area in zip(nodes, areas):
            handles[f"{node} (asks for {models[node]})"] = area
        total = stack.sum(axis=0)
        handles["model processes, summed RSS"], = ax.plot(times, total, color="black", lw=0.9)
        handles[f"budget {format_bytes(plan['budget_bytes'])}"] = ax.axhline(
            budget_mib, color="#d62728", ls="--", lw=1.4)
        lines = []
        for k, d in enumerate(r.get("decisions", []), start=1):
            marker, colour, label = MARKERS[_marker_kind(d)]
            y = float(np.interp(d["at_s"], times, total)) if len(times) else 0.0
            handles[label], = ax.plot(d["at_s"], y, marker=marker, color=colour, ms=8,
                                      mec="black", mew=0.6, ls="none", zorder=5)
            ax.annotate(str(k), (d["at_s"], y), xytext=(2, 6 + 7 * (k % 3)),
                        textcoords="offset points", fontsize=7, color="black", zorder=6)
            lines.append(_decision_line(k, d))
        sent = r.get("embed_sent_at_s", [])
        handles["embedding request sent"], = ax.plot(sent, [top * 0.015] * len(sent), "|",
                                                     color="#9467bd", ms=12, mew=1.8)
        ax.set_ylim(0, top)
        ax.set_xlim(0, max(times[-1] if len(times) else 1, 1))
        ax.set_ylabel("MiB")
        ax.set_xlabel("seconds since `dora run` started")
        done = r["requests"]
        ax.set_title(f"{variant}: peak {format_bytes(r['peak_bytes'])} = "
                     f"{r['peak_ratio']:.2f} x budget, {r['over_budget_s']:.0f} s over it; "
                     f"{done['completed']}/{done['sent']} requests completed, "
                     f"{done['failed']} failed", fontsize=10)
        ax.grid(alpha=0.3)
        side.axis("off")
        if "decisions" in r:
            heading = "scheduler decisions"
            if len(lines) > 34:
                lines = lines[:33] + [f"... and {len(lines) - 33} more (see the JSON)"]
        else:
            heading = "loads (every node on its own)"
            lines = [f"{e['node']:8} {e['model']:16} {e['seconds']:5.2f} s" for e in r["loads"]]
            lines += ["", "at the peak:"] + [
                f"{node:8} {format_bytes(rss):>10}" for node, rss in r["peak_parts"].items()]
        side.text(0, 1, heading + "\n\n" + "\n".join(lines), va="top", ha="left",
                  family="monospace", fontsize=7, transform=side.transAxes)
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center",
               ncol=5, fontsize=8)
    fig.suptitle("Model-process memory of the voice agent + an embedder under a "
                 f"{format_bytes(plan['budget_bytes'])} budget ({plan['fraction']:.2f} of the "
                 f"{format_bytes(plan['need_bytes'])} the models ask for), with and without "
                 "the scheduler", fontsize=11)
    save_figure(fig, path)


# --- main --------------------------------------------------------------------------------------

def main() -> int:
    parser = make_parser(__doc__, full_help=True)
    add_output_flags(parser, "memory_pressure.json", "memory_pressure.png")
    parser.add_argument("--fraction", type=float, default=0.5,
                        help="budget as a fraction of what all models need (default 0.5)")
    parser.add_argument("--budget", help="the budget itself (e.g. 1.6GiB), instead of --fraction")
    parser.add_argument("--only", choices=["scheduler", "unscheduled"],
                        help="run one variant only")
    parser.add_argument("--gap", type=float, default=10.0,
                        help="silence before the 2nd and 4th turns, seconds (default 10)")
    parser.add_argument("--timeout", type=float, default=200, help="longest run, seconds")
    parser.add_argument("--keep", type=Path, help="keep the runs' files (logs, journal) here")
    parser.add_argument("--replot", type=Path, metavar="JSON",
                        help="only redraw the PNG from the figures a run wrote")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads(args.replot.read_text())
        plot(args.png, saved["variants"], saved["budget"], saved["models"])
        print(f"wrote {args.png}")
        return 0

    # A TERM (like a Ctrl-C) unwinds through the `finally`s that end the graph's processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    catalog = Catalog.load()
    descriptor = yaml.safe_load(DATAFLOW.read_text())
    models = model_nodes(descriptor)
    budget = parse_size(args.budget, psutil.virtual_memory().total) if args.budget else None
    plan = budget_plan(catalog, models, args.fraction, budget)
    if plan["budget_bytes"] < plan["floor_bytes"]:
        print(f"warning: a budget of {format_bytes(plan['budget_bytes'])} is under what the "
              f"smallest variants need ({format_bytes(plan['floor_bytes'])}): some requests "
              "may be refused", file=sys.stderr)
    print(f"models: {', '.join(f'{n}={m}' for n, m in models.items())}; they need "
          f"{format_bytes(plan['need_bytes'])}, the smallest variants "
          f"{format_bytes(plan['floor_bytes'])}; budget {format_bytes(plan['budget_bytes'])}",
          file=sys.stderr)
    for model in sorted({m for name in models.values()
                         for m in [name, *catalog.smaller_than(name)]}):
        open_model(model, catalog=catalog, load=False)  # fetched and converted before the clock

    work = Path(tempfile.mkdtemp(prefix="memory-pressure-"))
    load = {"start": os.getloadavg()[0]}
    results: dict[str, dict] = {}
    try:
        inputs = work / "turns"
        turns = make_turns(inputs, args.gap)
        variants = {"scheduler": ["scheduler"], "unscheduled": ["no scheduler"]}.get(
            args.only, list(VARIANTS))
        for name in variants:
            results[name] = run_one(name, plan, models, turns, inputs,
                                    work / name.replace(" ", "-"), args.timeout)
            load[f"after {name}"] = os.getloadavg()[0]
        if args.keep:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print_table(results, plan)
    scheduled = results.get("scheduler")
    if scheduled:
        if scheduled["replay_mismatches"]:
            print(f"warning: {scheduled['replay_mismatches']} journal events are decided "
                  "differently when replayed through the policy", file=sys.stderr)
        print("\nscheduler decisions (seconds since start):")
        for d in scheduled["decisions"]:
            what = f"{d['node']} {d['model']}".strip()
            print(f"  {d['at_s']:7.2f}  {d['type']:6} {what:28} {d['reason']}")
    for name, r in results.items():
        print(f"\n{name}: the conversation")
        for line in r["voice"]["transcript"]:
            print(f"  {line[:100]}")
        for error in r["node_errors"]:
            print(f"{name}: {error}", file=sys.stderr)
    goals = {}
    if scheduled:
        goals = {"all_requests_completed": scheduled["requests"]["failed"] == 0
                 and scheduled["requests"]["completed"] == scheduled["requests"]["sent"] > 0,
                 "peak_within_5pct_of_budget": scheduled["peak_ratio"] <= 1.05}
        print(f"\ngoal with the scheduler, every request completed: "
              f"{scheduled['requests']['completed']}/{scheduled['requests']['sent']} -> "
              f"{'met' if goals['all_requests_completed'] else 'NOT met'}")
        print(f"goal with the scheduler, peak <= 1.05 x budget: {scheduled['peak_ratio']:.3f} x "
              f"-> {'met' if goals['peak_within_5pct_of_budget'] else 'NOT met'}")
    plot(args.png, results, plan, models)
    for r in results.values():
        r["series"] = r["series"][::10]  # every 250 ms in the JSON
    write_json(args.json, {
        **run_stamp(), "models": models,
        "budget": plan, "gap_s": args.gap, "turns": turns if results else [],
        "load_average_1min": load, "goals": goals,
        "table": [list(row) for row in table_rows(results, plan)],
        "variants": results,
    }, default=str)
    print(f"\nwrote {args.json} and {args.png}")
    complete = all(r["requests"]["failed"] == 0 and r["requests"]["sent"] > 0
                   for r in results.values())
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
