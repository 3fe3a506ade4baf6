"""From a spoken command to a checked drive: the action schema, the LLM's prompt, the safety
checks, and what the robot says about it (pure).

The LLM answers with JSON constrained to :data:`ACTION_SCHEMA` (structured output,
:mod:`mofa_omni.adapters.structured`); the JSON is decoded into :class:`RobotAction`, then
checked against the world: an unknown place, a hazard, a path through a hazard, a
drive into a wall or an absurd amount is refused with a reason the robot speaks,
and nothing is executed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

import msgspec

from mofa_omni.contract.tasks import ChatMessage, ChatRequest
from mofa_omni.robot.messages import Drive, Outcome, RobotState
from mofa_omni.robot.world import World

MAX_MOVE_M = 5


class RobotAction(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    action: Literal["go_to", "move", "turn", "stop"]
    target: str  # the place, for go_to
    amount: int  # metres for move (negative: back), degrees for turn (positive: left)


ACTION_SCHEMA = json.dumps({
    "type": "object",
    "properties": {
        "action": {"type": "string", "enum": ["go_to", "move", "turn", "stop"]},
        "target": {"type": "string", "maxLength": 32},
        "amount": {"type": "integer", "minimum": -360, "maximum": 360},
    },
    "required": ["action", "target", "amount"],
})

INSTRUCTIONS = (
    "You control a wheeled robot. Turn the user's command into one action as JSON. Actions: "
    "go_to (drive to a named place; target is the place), move (drive straight; amount in "
    "metres, negative backwards), turn (amount in degrees, positive left), stop.")
# Worked examples in the conversation teach a small model the mapping (few-shot prompting).
EXAMPLES = (
    ("Go to the charging dock.", RobotAction("go_to", "charging dock", 0)),
    ("Drive forward two metres.", RobotAction("move", "", 2)),
    ("Turn right by ninety degrees.", RobotAction("turn", "", -90)),
    ("Stop!", RobotAction("stop", "", 0)),
)


def action_request(command: str, state: RobotState | None, seen: str, world: World,
                   max_tokens: int = 48) -> ChatRequest:
    """The chat request that asks the LLM for the action a command means, with what the
    robot knows now (its pose and what its camera sees) in the context."""
    where = ("" if state is None else
             f" The robot is at x={state.x:.1f} m, y={state.y:.1f} m, facing {state.heading:.0f} degrees.")
    places = ", ".join(place.name for place in world.places)
    messages = [ChatMessage("system", f"{INSTRUCTIONS} Known places: {places}.{where} {seen}")]
    for said, action in EXAMPLES:
        messages += [ChatMessage("user", said),
                     ChatMessage("assistant", json.dumps(msgspec.to_builtins(action)))]
    messages.append(ChatMessage("user", command))
    return ChatRequest(messages, max_tokens, json_schema=ACTION_SCHEMA)


def parse_action(text: str) -> RobotAction:
    """The LLM's JSON as a RobotAction; msgspec's error message when it does not fit."""
    return msgspec.json.decode(text.encode(), type=RobotAction)


@dataclass(frozen=True, slots=True)
class Approved:
    drive: Drive
    description: str  # "go to the red ball"


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str  # a sentence the robot says


def check(action: RobotAction, drive_id: str, world: World, state: RobotState) -> Approved | Refused:
    """Approve ``action`` as a drive, or refuse it with the reason."""
    match action.action:
        case "stop":
            return Approved(Drive(drive_id, "stop"), "stop")
        case "go_to":
            place = world.find(action.target)
            if place is None:
                known = ", ".join(f"the {p.name}" for p in world.places if not p.hazard)
                return Refused(f"I don't know a place called {action.target or 'that'}. "
                               f"I can go to {known}.")
            if place.hazard:
                return Refused(f"I won't go to the {place.name}: {place.hazard}.")
            x, y = world.goal_for(place, state.x, state.y)
            if hazard := world.hazard_on_path(state.x, state.y, x, y):
                return Refused(f"I won't go there: the way to the {place.name} crosses "
                               f"the {hazard.name}.")
            return Approved(Drive(drive_id, "go_to", x, y), f"go to the {place.name}")
        case "move":
            if action.amount == 0 or abs(action.amount) > MAX_MOVE_M:
                return Refused(f"I can only move between 1 and {MAX_MOVE_M} metres at a time.")
            heading = math.radians(state.heading)
            x = state.x + action.amount * math.cos(heading)
            y = state.y + action.amount * math.sin(heading)
            if not world.inside(x, y):
                return Refused("I won't do that: it would drive me into the wall.")
            if hazard := world.hazard_on_path(state.x, state.y, x, y):
                return Refused(f"I won't do that: it would drive me into the {hazard.name}.")
            way = "forward" if action.amount > 0 else "back"
            return Approved(Drive(drive_id, "move", amount=float(action.amount)),
                            f"move {_metres(abs(action.amount))} {way}")
        case _:  # turn
            if action.amount == 0:
                return Refused("How far should I turn? Tell me the degrees.")
            side = "left" if action.amount > 0 else "right"
            return Approved(Drive(drive_id, "turn", amount=float(action.amount)),
                            f"turn {abs(action.amount)} degrees {side}")


def report(description: str, outcome: Outcome) -> str:
    """What the robot says when a drive has ended."""
    match outcome.status:
        case "done":
            if description == "stop":
                return "I stopped."
            done = description.replace("go to the", "reached the", 1).replace(
                "move", "moved", 1).replace("turn", "turned", 1)
            return f"I {done}." if not done.startswith("reached") else f"I have {done}."
        case "blocked":
            return f"I could not {description}: something is in the way."
        case "stopped":
            return f"I stopped before I could {description}."
        case _:
            return f"I could not {description} in time, so I stopped."


def _metres(amount: int) -> str:
    return "1 metre" if amount == 1 else f"{amount} metres"
