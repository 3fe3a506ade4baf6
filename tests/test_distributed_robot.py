"""dataflows/robot.split.yml on a coordinator and two daemons (machines A and B on loopback): the
robot's own computer runs audio, ASR, the planner and the simulator; the LLM and the TTS run on
the other machine."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mofa_omni.cluster.local import LocalCluster

SPLIT = Path(__file__).parents[1] / "dataflows" / "robot.split.yml"
pytestmark = pytest.mark.slow


def test_the_robot_split_over_two_machines_obeys_and_refuses(tmp_path):
    out = tmp_path / "out"
    with LocalCluster(["A", "B"], tmp_path / "cluster") as cluster:
        flow = cluster.start(SPLIT, env={"VOICE_OUTPUT": str(out)})
        assert cluster.wait_finished(flow, timeout=400) == "Finished", \
            cluster.node_logs("A")[-3000:]
        on_a, on_b = cluster.node_logs("A"), cluster.node_logs("B")
    for node, machine in [("sim", on_a), ("planner", on_a), ("asr", on_a), ("llm", on_b),
                          ("tts", on_b)]:
        assert f'"node":"{node}"' in machine, node
    assert '"node":"llm"' not in on_a and '"node":"sim"' not in on_b
    lines = (out / "transcript.txt").read_text().splitlines()
    spoken = [line for line in lines if line.startswith("robot: ")]
    assert spoken == ["robot: I have reached the red ball.",
                      "robot: I won't go to the lava pit: it is a hazard zone.",
                      "robot: I have reached the blue box."], lines
    assert len([line for line in lines if re.match(r"outcome: done at", line)]) == 2, lines
    assert len(list(out.glob("reply-*.wav"))) == 3  # synthesized on B, written on A
    assert len(list(out.glob("turn-*.png"))) == 3  # the camera, on A
