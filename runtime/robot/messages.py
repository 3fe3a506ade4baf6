"""Messages between the robot's planner and its simulator (or a real robot's driver).

The planner sends a :class:`Drive` on ``command``; the simulator reports
:class:`RobotState` a few times a second, one :class:`Outcome` when a drive ends,
and camera frames as :class:`mofa_omni.contract.tasks.Image` (Arrow, shared memory).
Each message here is one msgspec JSON string in a one-element Arrow string array,
as the control plane's are.
"""

from __future__ import annotations

from typing import Literal

import msgspec
import pyarrow as pa

from mofa_omni.contract.errors import ContractError

DriveKind = Literal["go_to", "move", "turn", "stop"]


class Drive(msgspec.Struct, frozen=True, tag="drive"):
    """Drive to (x, y) (``go_to``), straight ``amount`` metres (``move``, negative: back),
    turn ``amount`` degrees (``turn``, positive: left) or ``stop``."""

    drive_id: str
    kind: DriveKind
    x: float = 0.0
    y: float = 0.0
    amount: float = 0.0


class RobotState(msgspec.Struct, frozen=True, tag="state"):
    x: float
    y: float
    heading: float  # degrees, counter-clockwise from +x
    drive_id: str = ""  # the drive under way, "" when idle
    time_s: float = 0.0  # simulated time


class Outcome(msgspec.Struct, frozen=True, tag="outcome"):
    """How a drive ended: ``done``, ``blocked`` (no progress: an obstacle), ``stopped``
    (a newer drive or stop replaced it) or ``timeout``."""

    drive_id: str
    status: Literal["done", "blocked", "stopped", "timeout"]
    state: RobotState


RobotMessage = Drive | RobotState | Outcome

_decoder = msgspec.json.Decoder(RobotMessage)


def to_arrow(message: RobotMessage) -> pa.Array:
    return pa.array([msgspec.json.encode(message).decode()], pa.string())


def from_arrow(value: pa.Array) -> RobotMessage:
    """Decode one robot message; a malformed one raises ContractError saying what is wrong."""
    if not pa.types.is_string(value.type) or len(value) != 1:
        raise ContractError(f"a robot message is one string, got {len(value)} x {value.type}")
    try:
        return _decoder.decode(value[0].as_py())
    except (msgspec.ValidationError, msgspec.DecodeError) as error:
        raise ContractError(f"bad robot message: {error}") from None
