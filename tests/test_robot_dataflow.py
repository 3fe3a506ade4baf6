"""dataflows/robot.yml end to end with real models: spoken commands drive the simulated robot
to a named place, and an unsafe or impossible command is refused with a spoken reason."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mofa_omni.contract.tasks import TranscriptionRequest
from mofa_omni.media.audio import read_wav, write_wav
from mofa_omni.media.text import normalize_words, word_error_rate
from mofa_omni.robot.vision import sightings
from mofa_omni.robot.world import DEFAULT_WORLD, ROBOT_RADIUS
from tests.test_dataflow_models import run_dataflow

ROBOT = Path(__file__).parents[1] / "dataflows" / "robot.yml"
pytestmark = pytest.mark.slow


def turns_of(lines: list[str]) -> list[list[str]]:
    turns: list[list[str]] = []
    for line in lines:
        if line.startswith("user: "):
            turns.append([])
        turns[-1].append(line)
    return turns


def test_spoken_commands_drive_the_robot_and_a_hazard_is_refused_aloud(tmp_path, speak, model):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for name, text in [("01.wav", "Go to the red ball."), ("02.wav", "Drive into the lava pit."),
                       ("03.wav", "Go to the kitchen.")]:
        write_wav(inputs / name, speak(text), 16000)
    log = run_dataflow(ROBOT, {"VOICE_INPUT": str(inputs), "VOICE_OUTPUT": str(outputs)})
    lines = (outputs / "transcript.txt").read_text().splitlines()
    first, second, third = turns_of(lines)
    # on failure: the transcript and what the nodes logged
    nodes_said = "\n".join(line for line in log.splitlines()
                           if any(f" {node}:" in line for node in ("planner", "llm", "asr")))
    context = (lines, nodes_said[-4000:])

    # 1: reached the red ball (the simulator's pose at the end of the drive), and said so
    assert first[0] == "user: Go to the red ball.", context
    assert first[1] == 'action: {"action": "go_to", "target": "red ball", "amount": 0}' or \
        first[1].startswith('action: {"action": "go_to", "target": "red ball"'), context
    x, y = map(float, re.fullmatch(r"outcome: done at x=(\S+), y=(\S+)", first[2]).groups())
    ball = DEFAULT_WORLD.find("red ball")
    assert ((x - ball.x) ** 2 + (y - ball.y) ** 2) ** 0.5 < ball.radius + ROBOT_RADIUS + 0.3, lines
    assert first[3] == "robot: I have reached the red ball.", lines
    camera = read_png(outputs / "turn-001.png")
    assert sightings(camera, DEFAULT_WORLD)[0].name == "red ball"  # what it sees on arrival

    # 2 and 3: refused, nothing driven, the reason spoken
    assert second[0] == "user: Drive into the lava pit.", context
    assert second[-1] == "robot: I won't go to the lava pit: it is a hazard zone.", context
    # (SmolLM2 names the unknown place as it likes: "kitchen", "house"...)
    assert third[-1].startswith("robot: I don't know a place called "), context
    assert not any(line.startswith("outcome:") for line in second + third), lines

    replies = sorted(outputs.glob("reply-*.wav"))
    assert len(replies) == 3
    audio, rate = read_wav(replies[1])
    heard = model("whisper-tiny.en").transcribe(TranscriptionRequest(audio, rate)).text
    said = second[-1].removeprefix("robot: ")
    assert word_error_rate(said, heard) <= 0.5, (said, heard)
    assert {"lava", "pit"} & set(normalize_words(heard)), heard
    assert "Traceback" not in log, log[-5000:]


def read_png(path: Path):
    import matplotlib.image

    return (matplotlib.image.imread(path, format="png") * 255).round().astype("uint8")
