"""Swapping an LLM node's model while requests stream in: `omni swap` against dora's own tools.

    python benchmarks/hot_swap.py [--json FILE] [--requests N] [--interval S] [--only NAME...]

(Run it with the project's environment first on PATH: dora starts `.py` nodes with `python`.)

A driver (benchmarks/dataflows/chat_stream.py) sends a chat request every --interval seconds
(default 0.5; --requests in all, default 30), each carrying its own secret code in earlier turns,
once a first warm-up request was answered (the model is loaded and warm).
About a quarter of the way in, the LLM node's model (smollm2-135m) is replaced by a copy of it
under another catalog name -- the same weights and speed, so any extra latency is the swap's own:

  omni swap, both fit   `omni swap llm smollm2-135m-copy`; the budget holds both models, so the
                        copy loads beside the old one, which keeps serving
  omni swap, in place   `omni swap llm smollm2-135m-roomy`, whose catalog estimate is set from the
                        scheduler's status so that it fits only once the old model is unloaded
  dora node restart     `dora node restart llm` on the same graph without a scheduler (the node
                        comes back with the same model: dora has no way to change it)
  dora node replace     `dora node replace llm --from-yaml` with MODEL=smollm2-135m-copy

Each runs on a fresh `dora start` under this run's own coordinator. Measured per method, from the
driver's record: requests answered, lost (never answered; the driver waits SETTLE_S=30 s after
the last request) and failed; each request's latency (answer - sent); the extra wait, i.e. the
longest latency of a request sent from 1 s before the swap on, minus the median latency of all
the answered requests; and for omni swap, what the node measured (requests paused, longest wait, load).
The reference is the copy's load time, measured in this process (open_model, same weights).

Goals: 0 lost; extra wait ~ 0 when both models fit, and at most the load time when they do not.
Prints a table and writes benchmarks/results/hot_swap.json (or --json FILE). About 3 minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    BIN,
    FLOWS,
    ROOT,
    DoraCoordinator,
    add_output_flags,
    make_parser,
    print_header,
    wait_for_file,
    write_json,
)

from mofa_omni.models.catalog import variant_entry

SETTLE_S = 30
METHODS = ["omni swap, both fit", "omni swap, in place", "dora node restart", "dora node replace"]


def copy_entry(name: str, memory_mb: int) -> str:
    """smollm2-135m's weights under another name, with another memory estimate."""
    return variant_entry(name, "smollm2-135m", memory_mb=memory_mb)


class Coordinator(DoraCoordinator):
    """`dora up` on a free port, the scratch catalog for every command; `dora destroy` on
    leaving (a context manager)."""

    def __init__(self, catalog: Path):
        super().__init__({"MOFA_OMNI_CATALOG": catalog})
        self.catalog = catalog

    def start(self, flow: Path, name: str, work: Path, requests: int, interval: float) -> None:
        settings = {"WORK": work, "REQUESTS": requests, "INTERVAL_S": interval,
                    "SETTLE_S": SETTLE_S, "WARM_UP": 1, "MOFA_OMNI_CATALOG": self.catalog}
        env_args = [arg for key, value in settings.items() for arg in ("--env", f"{key}={value}")]
        done = self.run(self.dora, "start", str(flow), "--name", name, "--detach", *env_args)
        if done.returncode:
            raise RuntimeError(f"dora start failed: {done.stderr[-2000:]}")


def swap_with(method: str, dora: Coordinator, name: str, work: Path) -> dict:
    """Carry out one method's swap; what it reported and when it ran (seconds, monotonic)."""
    started = time.monotonic()
    if method.startswith("omni"):
        model = "smollm2-135m-copy"
        if method.endswith("in place"):
            done = dora.run(dora.omni, "status", "--json", timeout=30)
            status = json.loads(done.stdout)
            (node,) = status["nodes"]
            free = status["budget"] - status["used"]
            model = "smollm2-135m-roomy"
            with dora.catalog.open("a") as catalog:  # the graph reads the catalog again
                catalog.write(copy_entry(model, (free + node["model_bytes"] // 2) >> 20))
            started = time.monotonic()
        done = dora.run(dora.omni, "swap", "llm", model, "--json")
        outcome = json.loads(done.stdout) if done.stdout.strip() else {"error": done.stderr}
    elif method == "dora node restart":
        done = dora.run(dora.dora, "node", "restart", "llm", "--dataflow", name)
        outcome = {"exit": done.returncode, "output": (done.stdout + done.stderr)[-500:]}
    else:
        replacement = work / "llm.yml"
        replacement.write_text(
            f"id: llm\npath: {ROOT / 'nodes' / 'omni_node.py'}\n"
            f"env: {{ MODEL: smollm2-135m-copy }}\n"
            f"inputs:\n  request: {{ source: driver/ask, queue_size: 1000 }}\n"
            f"outputs: [result, error]\n")
        done = dora.run(dora.dora, "node", "replace", "llm", "--dataflow", name,
                        "--from-yaml", str(replacement))
        outcome = {"exit": done.returncode, "output": (done.stdout + done.stderr)[-500:]}
    return {"started": started, "ended": time.monotonic(), "outcome": outcome}


def measure(method: str, dora: Coordinator, index: int, requests: int, interval: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix="hot-swap-"))
    name = f"hot-swap-{index}"
    flow = FLOWS / ("hot_swap.yml" if method.startswith("omni") else "hot_swap_plain.yml")
    dora.start(flow, name, work, requests, interval)
    swap_after = max(requests // 4, 3)
    wait_for_file(work / "progress", lambda p: int(p.read_text() or 0) >= swap_after,
                  timeout=300, what="the first replies")
    swap = swap_with(method, dora, name, work)
    record = wait_for_file(work / "swap.json", lambda p: json.loads(p.read_text()),
                           timeout=requests * interval + SETTLE_S + 120, what="the driver's report")
    dora.run(dora.dora, "stop", name, timeout=60)
    shutil.rmtree(work, ignore_errors=True)
    return summarize(method, record, swap)


def summarize(method: str, record: dict, swap: dict) -> dict:
    answered = [e for e in record["finished"] if "error" not in e]
    failed = [e for e in record["finished"] if "error" in e]
    swap_at = swap["started"] - record["started"]  # on the driver's timeline
    latency = {e["id"]: e["answered"] - e["sent"] for e in answered}
    during = [latency[e["id"]] for e in answered if e["sent"] >= swap_at - 1]
    baseline = statistics.median(latency.values()) if latency else 0.0
    order_kept = [e["id"] for e in record["finished"]] == sorted(e["id"] for e in record["finished"])
    outcome = swap["outcome"]
    return {
        "method": method, "requests": record["requests"], "answered": len(answered),
        "lost": len(record["lost"]), "failed": len(failed), "order_kept": order_kept,
        "knew_their_code": sum(e["code"] in e["reply"] for e in answered),
        "models": sorted({e["model"] for e in answered}),
        "median_latency_s": round(baseline, 3),
        "extra_wait_s": round(max(during, default=baseline) - baseline, 3),
        "command_s": round(swap["ended"] - swap["started"], 3),
        "node_paused_s": outcome.get("paused_seconds"),
        "node_longest_wait_s": outcome.get("longest_wait"),
        "node_load_s": outcome.get("load_seconds"),
        "mode": outcome.get("mode"), "outcome": outcome, "swap_at_s": round(swap_at, 3),
        "timeline": [{"id": e["id"], "sent_s": round(e["sent"], 3),
                      "latency_s": round(latency[e["id"]], 3), "model": e["model"]}
                     for e in answered],
        "lost_ids": [e["id"] for e in record["lost"]],
    }


def reference_load_seconds(catalog: Path) -> float:
    """The copy's load time with nothing around it (already converted by the runs)."""
    from mofa_omni.adapters.loading import open_model
    from mofa_omni.contract.tasks import Task
    from mofa_omni.models.catalog import Catalog

    adapter = open_model("smollm2-135m-copy", task=Task.TEXT_GENERATION,
                         catalog=Catalog.load([catalog]))
    seconds = adapter.load_seconds
    adapter.unload()
    return seconds


def print_table(rows: list[dict], load_s: float) -> None:
    print(f"\nnew model's load time (smollm2-135m-copy, measured alone): {load_s:.2f} s\n")
    header = (f"{'method':22} {'answered':>8} {'lost':>5} {'failed':>6} {'order':>6} "
              f"{'median':>7} {'extra wait':>10} {'vs load':>7} {'paused':>7} {'command':>8}")
    print_header(header)
    for r in rows:
        paused = f"{r['node_paused_s']:.3f}" if r["node_paused_s"] is not None else "-"
        print(f"{r['method']:22} {r['answered']:>5}/{r['requests']:<2} {r['lost']:>5} "
              f"{r['failed']:>6} {'kept' if r['order_kept'] else 'NO':>6} "
              f"{r['median_latency_s']:>6.2f}s {r['extra_wait_s']:>9.2f}s "
              f"{r['extra_wait_s'] / load_s if load_s else 0:>6.2f}x {paused:>7} "
              f"{r['command_s']:>7.2f}s")


def main() -> int:
    parser = make_parser(__doc__)
    add_output_flags(parser, "hot_swap.json")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--only", nargs="*", choices=METHODS, default=METHODS)
    args = parser.parse_args()

    from mofa_omni.models.compute import ensure_fast_blas

    ensure_fast_blas()
    scratch = Path(tempfile.mkdtemp(prefix="hot-swap-catalog-"))
    catalog = scratch / "catalog.toml"
    catalog.write_text(copy_entry("smollm2-135m-copy", 660))
    subprocess.run([str(BIN / "omni"), "pull", "smollm2-135m-copy"],
                   env={**os.environ, "MOFA_OMNI_CATALOG": str(catalog)}, check=True)
    rows = []
    with Coordinator(catalog) as dora:
        for index, method in enumerate(args.only):
            print(f"{method} ...", flush=True)
            rows.append(measure(method, dora, index, args.requests, args.interval))
    load_s = reference_load_seconds(catalog)
    print_table(rows, load_s)
    write_json(args.json, {"load_seconds": load_s, "interval_s": args.interval, "methods": rows},
               indent=2, ensure_ascii=False)
    print(f"\nwrote {args.json}")
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
