"""The robot's pieces without dora: world geometry, physics simulation, camera and vision,
the action checks and the planner's turns (pure state machine)."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest

from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.schema import parse_schema
from mofa_omni.media.png import png_bytes
from mofa_omni.robot.actions import (
    ACTION_SCHEMA,
    Approved,
    Refused,
    RobotAction,
    action_request,
    check,
    parse_action,
    report,
)
from mofa_omni.robot.messages import Drive, Outcome, RobotState, from_arrow, to_arrow
from mofa_omni.robot.planner import AskLLM, Deadlines, LogLine, Planner, Say, SendDrive, TurnDone
from mofa_omni.robot.sim import Simulation
from mofa_omni.robot.vision import describe, sightings
from mofa_omni.robot.world import DEFAULT_WORLD as WORLD
from mofa_omni.robot.world import ROBOT_RADIUS

START = RobotState(3.0, 2.0, 0.0)


def drive_until_done(sim: Simulation, drive: Drive, seconds: float = 30) -> Outcome:
    sim.start(drive)
    for _ in range(int(seconds / 0.05)):
        if outcome := sim.step(0.05):
            return outcome
    pytest.fail(f"{drive} did not end in {seconds} s")


def test_places_are_found_by_what_people_say():
    assert WORLD.find("The Red Ball.").name == "red ball"
    assert WORLD.find("ball").name == "red ball"  # one place has that word
    assert WORLD.find("kitchen") is None
    assert WORLD.find("") is None


def test_the_simulated_robot_drives_to_a_place_and_stops_short_of_it():
    sim = Simulation(WORLD)
    ball = WORLD.find("red ball")
    outcome = drive_until_done(sim, Drive("d", "go_to", *WORLD.goal_for(ball, 3.0, 2.0)))
    assert outcome.status == "done"
    gap = math.hypot(outcome.state.x - ball.x, outcome.state.y - ball.y) - ball.radius - ROBOT_RADIUS
    assert 0.05 < gap < 0.25  # close, without touching


def test_turning_and_driving_straight():
    sim = Simulation(WORLD)
    assert drive_until_done(sim, Drive("t", "turn", amount=90)).state.heading == pytest.approx(90, abs=2)
    moved = drive_until_done(sim, Drive("m", "move", amount=1.0)).state
    assert (moved.x, moved.y) == (pytest.approx(3.0, abs=0.05), pytest.approx(3.0, abs=0.05))


def test_a_wall_blocks_the_robot():
    sim = Simulation(WORLD)
    outcome = drive_until_done(sim, Drive("w", "move", amount=10.0))
    assert outcome.status == "blocked"
    assert outcome.state.x < WORLD.width


def test_a_new_drive_stops_the_one_under_way():
    sim = Simulation(WORLD)
    sim.start(Drive("a", "move", amount=2.0))
    sim.step(0.5)
    ended = sim.start(Drive("b", "stop"))
    assert [(o.drive_id, o.status) for o in ended] == [("a", "stopped"), ("b", "done")]
    assert sim.state().drive_id == ""


def test_the_camera_sees_what_is_ahead():
    sim = Simulation(WORLD)
    frame = sim.camera()
    assert frame.shape == (96, 128, 3) and frame.dtype == np.uint8
    sides = {s.name: s.side for s in sightings(frame, WORLD)}
    assert sides == {"red ball": "on the left", "lava pit": "on the right"}  # facing +x
    ball = WORLD.find("red ball")
    sim.body.angle = math.atan2(ball.y - 2.0, ball.x - 3.0)  # face the ball
    seen = sightings(sim.camera(), WORLD)
    assert [s.name for s in seen][:1] == ["red ball"] and seen[0].side == "ahead"
    assert describe(seen).startswith("The camera sees the red ball ahead")
    with pytest.raises(ContractError, match="channels"):
        sightings(np.zeros((4, 4, 1), np.uint8), WORLD)


def test_frames_are_saved_as_png():
    frame = Simulation(WORLD).camera()
    data = png_bytes(frame)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    read = matplotlib.image.imread(io.BytesIO(data), format="png")
    np.testing.assert_array_equal((read * 255).round().astype(np.uint8), frame)


def test_the_action_schema_is_one_structured_output_accepts():
    parse_schema(ACTION_SCHEMA)
    assert parse_action('{"action": "go_to", "target": "red ball", "amount": 0}') == \
        RobotAction("go_to", "red ball", 0)
    with pytest.raises(Exception, match="action"):
        parse_action('{"action": "fly", "target": "", "amount": 0}')
    request = action_request("Go to the blue box.", START, "The camera sees no known place.", WORLD)
    system = request.messages[0].content
    assert "blue box" in system and "x=3.0" in system and "camera" in system
    assert request.messages[-1].content == "Go to the blue box." and request.json_schema


@pytest.mark.parametrize("action, reason", [
    (RobotAction("go_to", "kitchen", 0), "don't know a place called kitchen"),
    (RobotAction("go_to", "lava pit", 0), "won't go to the lava pit"),
    (RobotAction("move", "", 9), "between 1 and 5 metres"),
    (RobotAction("move", "", 0), "between 1 and 5 metres"),
    (RobotAction("move", "", 4), "into the wall"),
    (RobotAction("turn", "", 0), "How far"),
])
def test_invalid_or_unsafe_actions_are_refused_with_a_reason(action, reason):
    decision = check(action, "d", WORLD, START)
    assert isinstance(decision, Refused) and reason in decision.reason


def test_a_path_through_a_hazard_is_refused():
    near_lava = RobotState(4.9, 2.2, -90.0)  # facing the lava pit, the dock beyond it
    decision = check(RobotAction("move", "", 2), "d", WORLD, near_lava)
    assert isinstance(decision, Refused) and "lava pit" in decision.reason


def test_approved_actions_become_drives():
    go = check(RobotAction("go_to", "the blue box", 0), "d", WORLD, START)
    assert isinstance(go, Approved) and go.drive.kind == "go_to" and go.description == "go to the blue box"
    turn = check(RobotAction("turn", "", -90), "t", WORLD, START)
    assert turn.drive == Drive("t", "turn", amount=-90.0) and turn.description == "turn 90 degrees right"
    state = START
    assert report(go.description, Outcome("d", "done", state)) == "I have reached the blue box."
    assert "something is in the way" in report(go.description, Outcome("d", "blocked", state))


def test_robot_messages_travel_as_typed_arrow():
    state = RobotState(1.0, 2.0, 30.0, "d", 4.5)
    assert from_arrow(to_arrow(state)) == state
    with pytest.raises(ContractError, match="bad robot message"):
        import pyarrow as pa

        from_arrow(pa.array(['{"type": "drive"}']))


def planner() -> Planner:
    p = Planner(WORLD, Deadlines(think_s=10, drive_s=20, speak_s=30))
    p.robot_state(START)
    return p


def test_a_turn_from_command_to_spoken_outcome():
    p = planner()
    asked = p.heard("turn-1", "Go to the red ball.", 0.0)
    assert asked[0] == LogLine("user", "Go to the red ball.") and isinstance(asked[1], AskLLM)
    assert p.heard("turn-2", "Stop.", 0.5) == []  # waits its turn
    reply = '{"action": "go_to", "target": "red ball", "amount": 0}'
    assert p.reply_text("turn-1-action", reply[:10], False, 1.0) == []
    actions = p.reply_text("turn-1-action", reply[10:], True, 1.0)
    assert isinstance(actions[-1], SendDrive) and actions[-1].drive.drive_id == "turn-1-drive"
    assert p.outcome(Outcome("other", "done", START), 2.0) == []  # not this turn's drive
    said = p.outcome(Outcome("turn-1-drive", "done", RobotState(4.7, 2.9, 30.0)), 5.0)
    assert said[-1] == Say("turn-1-say", "I have reached the red ball.")
    assert p.state.x == 4.7
    after = p.spoken("turn-1-say", 6.0)
    assert after[0] == TurnDone("turn-1") and isinstance(after[-1], AskLLM)  # the next command


def test_stop_said_during_a_drive_stops_the_robot_at_once():
    p = planner()
    p.heard("turn-1", "Go to the blue box.", 0.0)
    p.reply_text("turn-1-action", '{"action": "go_to", "target": "blue box", "amount": 0}', True, 1.0)
    actions = p.heard("turn-2", "Stop!", 2.0)
    assert actions[1:] == [SendDrive(Drive("turn-2-stop", "stop")), TurnDone("turn-2")]
    said = p.outcome(Outcome("turn-1-drive", "stopped", START), 2.1)
    assert said[-1] == Say("turn-1-say", "I stopped before I could go to the blue box.")
    # not driving: an ordinary command, queued behind the turn being spoken
    assert p.heard("turn-3", "Stop.", 3.0) == []
    assert list(p.waiting) == [("turn-3", "Stop.")]


def test_a_refused_command_is_spoken_and_never_driven():
    p = planner()
    p.heard("turn-1", "Drive into the lava pit.", 0.0)
    actions = p.reply_text("turn-1-action", json.dumps(
        {"action": "go_to", "target": "lava pit", "amount": 0}), True, 1.0)
    assert not any(isinstance(a, SendDrive) for a in actions)
    assert actions[-1] == Say("turn-1-say", "I won't go to the lava pit: it is a hazard zone.")


def test_every_phase_has_a_deadline():
    p = planner()
    p.heard("turn-1", "Go to the red ball.", 0.0)
    assert p.expire(5.0) == []
    assert "in time" in p.expire(11.0)[-1].text  # the LLM never answered
    assert p.expire(20.0) == []
    assert p.expire(42.0)[0] == TurnDone("turn-1")  # the sentence was never confirmed spoken
    p.heard("turn-2", "Go to the blue box.", 50.0)
    p.reply_text("turn-2-action", '{"action": "go_to", "target": "blue box", "amount": 0}', True, 51.0)
    stuck = p.expire(72.0)
    assert stuck[0] == SendDrive(Drive("turn-2-halt", "stop")) and "so I stopped" in stuck[-1].text


def test_unreadable_replies_and_llm_errors_end_in_a_sentence():
    p = planner()
    p.heard("turn-1", "Go.", 0.0)
    assert "did not understand" in p.reply_text("turn-1-action", "{oops", True, 1.0)[-1].text
    p.spoken("turn-1-say", 2.0)
    p.heard("turn-2", "Go.", 3.0)
    assert "could not work out" in p.llm_failed("turn-2-action", "timeout: slow", 4.0)[-1].text
    assert p.heard("turn-3", " [BLANK_AUDIO] ", 5.0) == [TurnDone("turn-3")]


def test_a_silent_llm_is_asked_again_and_its_late_answer_to_the_old_id_ignored():
    # dora may drop the last message of a reply, which no later message would reveal
    p = Planner(WORLD, Deadlines(think_s=60, reask_s=5))
    p.robot_state(START)
    first = p.heard("turn-1", "Go to the red ball.", 0.0)[-1]
    reply = '{"action": "go_to", "target": "red ball", "amount": 0}'
    assert p.reply_text("turn-1-action", reply[:10], False, 3.0) == []  # the rest is lost
    assert p.expire(7.0) == []  # silent for 4 s only
    again = p.expire(8.0)
    assert again == [AskLLM("turn-1-action-1", first.request)]
    assert p.reply_text("turn-1-action", reply[10:], True, 9.0) == []  # too late: ignored
    actions = p.reply_text("turn-1-action-1", reply, True, 10.0)
    assert isinstance(actions[-1], SendDrive) and actions[-1].drive.drive_id == "turn-1-drive"
    assert actions[0] == LogLine("action", reply)
