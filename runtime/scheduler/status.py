"""How ``omni status`` and ``omni swap`` show what a running graph told them."""

from __future__ import annotations

from mofa_omni.models.memory import format_bytes
from mofa_omni.scheduler.messages import NodeStatus, Status, SwapOutcome

_HEADER = (f"{'node':14} {'model':20} {'wants':20} {'state':12} {'resident':>10} {'model':>10} "
           f"{'queue':>5}")


def _node_line(n: NodeStatus) -> str:
    wants = n.wanted if n.wanted != n.model else ""
    restarts = f"  restarted {n.restarts}x after crashes" if n.restarts else ""
    # a model decoding fewer requests together than it would: the budget holds no more
    together = f"  {n.parallel} of {n.wanted_parallel} requests together" \
        if 0 < n.parallel < n.wanted_parallel else ""
    return (f"{n.node:14} {n.model:20} {wants:20} {n.state:12} "
            f"{format_bytes(n.rss):>10} {format_bytes(n.model_bytes):>10} {n.queue:>5}"
            f"{restarts}{together}")


def _machine_lines(status: Status) -> list[str]:
    """One block per machine: its budget and memory, then its nodes."""
    lines = []
    for m in status.machines:
        lines += ["", f"machine {m.machine}" + (f"  LOST: {m.detail}" if m.lost else ""),
                  f"  budget   {format_bytes(m.budget)}; used {format_bytes(m.used)} (reserved), "
                  f"{format_bytes(m.measured)} measured",
                  "  system   " + (f"{format_bytes(m.available)} available of "
                                    f"{format_bytes(m.total)} (keeps "
                                    f"{format_bytes(m.min_available)} free)"
                                    if m.total else "not reported yet"),
                  "  " + _HEADER]
        lines += ["  " + _node_line(n) for n in status.nodes if n.machine == m.machine]
    return lines


def render_status(status: Status) -> str:
    """The status as a table: memory, then each node, then the last decisions. A graph on
    several machines is shown machine by machine, each with its own budget."""
    if status.machines:
        lines = [f"machines   {len(status.machines)}; budgets {format_bytes(status.budget)} in "
                 f"all, used {format_bytes(status.used)} (reserved), "
                 f"{format_bytes(status.measured)} measured"]
    else:
        lines = [
            f"budget     {format_bytes(status.budget)}; used {format_bytes(status.used)} "
            f"(reserved), {format_bytes(status.measured)} measured, peak "
            f"{format_bytes(status.peak_measured)}",
            f"system     {format_bytes(status.available)} available of "
            f"{format_bytes(status.total)} (keeps {format_bytes(status.min_available)} free)"]
    lines.append("pipelines  " + "; ".join(
        " + ".join(group) + (" (active)" if i in status.active else "")
        for i, group in enumerate(status.pipelines)))
    if status.machines:
        lines += _machine_lines(status)
    else:
        lines += ["", _HEADER] + [_node_line(n) for n in status.nodes]
    lost = {f"{n.node}/{name}": count for n in status.nodes for name, count in n.lost.items()}
    lost |= {f"scheduler/{name}": count for name, count in status.lost.items()}
    lines += ["", "messages lost  " + (", ".join(f"{where} {count}" for where, count in lost.items())
                                       + " (dora dropped them: gaps in their stream numbers)"
                                       if lost else "none (no gap in any input's stream numbers)")]
    if status.decisions:
        lines += ["", "last decisions"]
        for d in status.decisions[-10:]:
            lines.append(f"  {d.at:8.1f} s  {d.action:7} {d.node:12} {d.model:20} {d.reason}")
    return "\n".join(lines)


_MODES = {"beside": "loaded beside the old model, which kept serving",
          "in_place": "loaded in place of the old model (both did not fit the budget)",
          "not_loaded": "the node held no model: its next request loads the new one"}


def render_swap(outcome: SwapOutcome) -> str:
    """One swap's outcome: what happened, how long it took and what requests paid for it."""
    if not outcome.ok:
        return (f"{outcome.node}: swap to {outcome.new_model} failed: {outcome.detail}\n"
                f"{outcome.node} still serves {outcome.old_model or 'its model'}")
    if outcome.mode == "none":
        return f"{outcome.node}: {outcome.detail}"
    lines = [f"{outcome.node}: {outcome.old_model} -> {outcome.new_model}, "
             f"{_MODES[outcome.mode]}"]
    if outcome.mode != "not_loaded":
        lines.append(f"  switch took {outcome.total_seconds:.2f} s (loading "
                     f"{outcome.load_seconds:.2f} s); requests paused {outcome.paused_seconds:.3f} s"
                     f" ({outcome.waited} queued at the switch, the longest extra wait "
                     f"{outcome.longest_wait:.3f} s)")
    if outcome.detail:
        lines.append(f"  scheduler: {outcome.detail}")
    if outcome.warning:
        lines.append(f"  warning: {outcome.warning}")
    return "\n".join(lines)
