"""robot_planner: turns heard commands into checked drives and says what happened.

Configuration (env in the dataflow YAML):
    THINK_TIMEOUT_S  longest wait for the LLM's action (default 120)
    REASK_AFTER_S    the LLM silent this long: ask it again, its reply was lost (default 20)
    DRIVE_TIMEOUT_S  longest drive in wall-clock seconds before the robot is stopped (default 60)
    VOICE_OUTPUT     folder for transcript.txt and the camera view after each turn
                     (turn-NNN.png); default $DEFAULT_OUTPUT of this checkout, else out/voice

Inputs:
    transcript  Transcript of a command (an ASR node's `result`)
    asr_error   ErrorReport of the ASR: that turn is over
    reply       TextChunk stream of the LLM: the action as JSON (structured output)
    llm_error   ErrorReport of the LLM
    state       RobotState from the simulator
    outcome     Outcome of a drive
    frame       the robot's camera (Image): what it sees goes into the LLM's context
    spoken      the sink's `done`: a sentence has been spoken
    tts_error   ErrorReport of the TTS: the sentence is skipped
Outputs:
    action      ChatRequest for the LLM, with the action schema (request_id `turn-N-action`)
    command     Drive for the simulator
    speech      SpeechRequest for the TTS (request_id `turn-N-say`)
    turn_done   the turn is over (connect it to wav_source's `ready`)

The node ends once `transcript` is closed and the last turn is over.
"""

from __future__ import annotations

import logging

import pyarrow as pa

from mofa_omni.config import env_float, exit_on_bad_settings
from mofa_omni.contract import arrow
from mofa_omni.contract.tasks import ErrorReport, Image, SpeechRequest, TextChunk, Transcript
from mofa_omni.media.png import png_bytes
from mofa_omni.node.dispatch import dispatch
from mofa_omni.node.host import MessageMeta
from mofa_omni.node.integrity import CheckedNode
from mofa_omni.robot import messages as robot_messages
from mofa_omni.robot.messages import Outcome, RobotState
from mofa_omni.robot.planner import AskLLM, Deadlines, LogLine, Planner, Say, SendDrive, TurnDone
from mofa_omni.robot.vision import describe, sightings
from mofa_omni.robot.world import DEFAULT_WORLD
from mofa_omni.voice.events import voice_output

log = logging.getLogger("robot_planner")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with exit_on_bad_settings("robot_planner"):  # fail fast, before joining the graph
        deadlines = Deadlines(env_float("THINK_TIMEOUT_S", 120), env_float("DRIVE_TIMEOUT_S", 60),
                              reask_s=env_float("REASK_AFTER_S", 20, minimum=1))
        out_dir = voice_output()
    node = CheckedNode()
    planner = Planner(DEFAULT_WORLD, deadlines)
    out_dir.mkdir(parents=True, exist_ok=True)
    transcript = (out_dir / "transcript.txt").open("w", buffering=1)
    last_frame = None
    turns = 0

    def act(actions) -> None:
        nonlocal turns
        for action in actions:
            match action:
                case AskLLM(request_id, request):
                    node.send_output("action", arrow.encode(request), {"request_id": request_id})
                case SendDrive(drive):
                    node.send_output("command", robot_messages.to_arrow(drive),
                                     {"request_id": drive.drive_id})
                case Say(say_id, text):
                    node.send_output("speech", arrow.encode(SpeechRequest(text)),
                                     {"request_id": say_id})
                case TurnDone(turn_id):
                    turns += 1
                    if last_frame is not None:
                        (out_dir / f"turn-{turns:03d}.png").write_bytes(png_bytes(last_frame))
                    node.send_output("turn_done", pa.array([turn_id]), {"request_id": turn_id})
                case LogLine() as line:
                    log.info("%s", line.render())
                    transcript.write(line.render() + "\n")

    def on_frame(value: pa.Array) -> None:
        nonlocal last_frame
        last_frame = arrow.decode(value, Image).pixels
        planner.camera(describe(sightings(last_frame, DEFAULT_WORLD)))

    def on_state(value: pa.Array) -> None:
        message = robot_messages.from_arrow(value)
        if isinstance(message, RobotState):
            planner.robot_state(message)

    def on_outcome(meta: MessageMeta, value: pa.Array, now: float):
        message = robot_messages.from_arrow(value)
        return planner.outcome(message, now) if isinstance(message, Outcome) else []

    handlers = {
        "transcript": lambda meta, value, now: planner.heard(
            meta.request_id, arrow.decode(value, Transcript).text, now),
        "asr_error": lambda meta, value, now: [TurnDone(meta.request_id)],
        "reply": lambda meta, value, now: planner.reply_text(
            meta.request_id, arrow.decode(value, TextChunk).text, meta.final, now),
        "llm_error": lambda meta, value, now: planner.llm_failed(
            meta.request_id, arrow.decode(value, ErrorReport).summary(), now),
        "outcome": on_outcome,
        "state": lambda meta, value, now: on_state(value) or [],
        "frame": lambda meta, value, now: on_frame(value) or [],
        "spoken": lambda meta, value, now: planner.spoken(meta.request_id, now),
        "tts_error": lambda meta, value, now: planner.spoken(meta.request_id, now),
    }
    dispatch(node, handlers, act, expire=planner.expire, last_input="transcript",
             busy=lambda: planner.turn is not None or bool(planner.waiting), log=log,
             tick_s=1.0)
    transcript.close()



if __name__ == "__main__":
    main()
