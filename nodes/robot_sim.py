"""robot_sim: a wheeled robot in a pymunk physics world (headless), driven by the planner.

Configuration (env in the dataflow YAML):
    SIM_SPEED     simulated seconds per second of wall-clock time (default 1; 4 = four times faster)
    FRAME_EVERY   ticks between camera frames and state reports (default 2)

Inputs:
    tick      a dora timer (50 ms): each tick advances the world by 50 ms x SIM_SPEED
    command   Drive messages (mofa_omni.robot.messages) from the planner
Outputs:
    state     RobotState, every FRAME_EVERY ticks
    outcome   Outcome of each drive (done, blocked, stopped)
    frame     the forward camera as an Image (uint8 HWC, 96 x 128 x 3), every FRAME_EVERY ticks

The node ends when its `command` input closes (the planner is done).
"""

from __future__ import annotations

import logging

from mofa_omni.config import env_float, env_int, exit_on_bad_settings
from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import Image
from mofa_omni.node.integrity import CheckedNode
from mofa_omni.robot import messages as robot_messages
from mofa_omni.robot.messages import Drive
from mofa_omni.robot.sim import Simulation
from mofa_omni.robot.world import DEFAULT_WORLD

log = logging.getLogger("robot_sim")
TICK_S = 0.05


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with exit_on_bad_settings("robot_sim"):  # fail fast, before joining the graph
        speed = env_float("SIM_SPEED", 1.0)
        frame_every = env_int("FRAME_EVERY", 2, minimum=1)
    node = CheckedNode()
    sim = Simulation(DEFAULT_WORLD)
    ticks = 0

    def send_outcomes(outcomes) -> None:
        for outcome in outcomes:
            log.info("%s %s at (%.2f, %.2f)", outcome.drive_id, outcome.status,
                     outcome.state.x, outcome.state.y)
            node.send_output("outcome", robot_messages.to_arrow(outcome),
                             {"request_id": outcome.drive_id})

    while (event := node.next()) is not None:
        if event["type"] == "INPUT_CLOSED" and event["id"] == "command":
            break
        if event["type"] != "INPUT":
            continue
        if event["id"] == "tick":
            ticks += 1
            outcome = sim.step(TICK_S * speed)
            send_outcomes([outcome] if outcome else [])
            if ticks % frame_every == 0:
                node.send_output("state", robot_messages.to_arrow(sim.state()))
                node.send_output("frame", arrow.encode(Image(sim.camera())))
        elif event["id"] == "command":
            try:
                drive = robot_messages.from_arrow(event["value"])
                if not isinstance(drive, Drive):
                    raise ContractError(f"expected a drive, got {type(drive).__name__}")
            except ContractError as error:
                log.error("command: %s", error)
                continue
            log.info("%s: %s %s", drive.drive_id, drive.kind,
                     f"to ({drive.x:.2f}, {drive.y:.2f})" if drive.kind == "go_to" else drive.amount)
            send_outcomes(sim.start(drive))


if __name__ == "__main__":
    main()
