"""A wheeled robot in a pymunk physics world, with a forward-looking camera (headless).

The robot is a dynamic disc driven by velocity commands (it turns on the spot and
drives forward, as a differential-drive robot does); walls and solid places are
static bodies it collides with; hazard zones are sensors it can drive over. The
camera casts one ray per image column through the physics world and draws the
first thing each ray meets (walls grey and shaded by distance, places in their
own colour), giving a uint8 HWC frame.
"""

from __future__ import annotations

import math

import numpy as np
import pymunk

from mofa_omni.robot.messages import Drive, Outcome, RobotState
from mofa_omni.robot.world import ROBOT_RADIUS, World

MAX_SPEED = 0.6  # m/s
MAX_TURN = math.radians(120)  # rad/s
PHYSICS_STEP = 0.01  # s
STUCK_AFTER = 2.0  # s without getting 2 cm closer: blocked
CAMERA_FOV = math.radians(70)
CAMERA_RANGE = 10.0
SKY, FLOOR, WALL = (30, 30, 38), (150, 150, 140), (200, 200, 200)
_ROBOT = pymunk.ShapeFilter(categories=0b10)
_SEEN = pymunk.ShapeFilter(mask=pymunk.ShapeFilter.ALL_MASKS() ^ 0b10)


class Simulation:
    """The physics world, one drive at a time. ``step`` advances it; drives end in an Outcome."""

    def __init__(self, world: World):
        self.world = world
        self.space = pymunk.Space()
        self.colours: dict[pymunk.Shape, tuple[int, int, int]] = {}
        self.time_s = 0.0
        w, h = world.width, world.height
        for a, b in (((0, 0), (w, 0)), ((w, 0), (w, h)), ((w, h), (0, h)), ((0, h), (0, 0))):
            wall = pymunk.Segment(self.space.static_body, a, b, 0.02)
            self.space.add(wall)
            self.colours[wall] = WALL
        for place in world.places:
            shape = pymunk.Circle(self.space.static_body, place.radius, (place.x, place.y))
            shape.sensor = not place.solid
            self.space.add(shape)
            self.colours[shape] = place.colour
        x, y, heading = world.start
        self.body = pymunk.Body(5.0, pymunk.moment_for_circle(5.0, 0, ROBOT_RADIUS))
        self.body.position = (x, y)
        self.body.angle = math.radians(heading)
        disc = pymunk.Circle(self.body, ROBOT_RADIUS)
        disc.filter = _ROBOT
        self.space.add(self.body, disc)
        self.drive: Drive | None = None
        self._goal: tuple[float, float] | None = None
        self._goal_angle = 0.0
        self._best = (math.inf, 0.0)  # closest distance to the goal so far, and when

    # --- driving -----------------------------------------------------------------------

    def start(self, drive: Drive) -> list[Outcome]:
        """Begin ``drive``: the Outcomes that ends (the drive it replaces, stopped; a stop, done)."""
        ended = [self._end("stopped")] if self.drive is not None else []
        x, y = self.body.position
        if drive.kind == "stop":
            self._halt()
            return ended + [Outcome(drive.drive_id, "done", self.state())]
        self.drive = drive
        if drive.kind == "go_to":
            self._goal = (drive.x, drive.y)
        elif drive.kind == "move":
            self._goal = (x + drive.amount * math.cos(self.body.angle),
                          y + drive.amount * math.sin(self.body.angle))
        else:
            self._goal = None
            self._goal_angle = self.body.angle + math.radians(drive.amount)
        self._best = (math.inf, self.time_s)
        return ended

    def step(self, seconds: float) -> Outcome | None:
        """Advance the world by ``seconds``; the Outcome of a drive that ended meanwhile."""
        outcome = None
        for _ in range(max(1, round(seconds / PHYSICS_STEP))):
            if self.drive is not None and outcome is None:
                outcome = self._control()
            self.space.step(PHYSICS_STEP)
            self.time_s += PHYSICS_STEP
        return outcome

    def _control(self) -> Outcome | None:
        x, y = self.body.position
        if self._goal is None:  # turning on the spot
            error = _wrap(self._goal_angle - self.body.angle)
            if abs(error) < math.radians(1.5):
                return self._end("done")
            self.body.velocity = (0, 0)
            self.body.angular_velocity = max(-MAX_TURN, min(MAX_TURN, 4 * error))
            return None
        gx, gy = self._goal
        distance = math.hypot(gx - x, gy - y)
        if distance < 0.03:
            return self._end("done")
        if distance < self._best[0] - 0.02:
            self._best = (distance, self.time_s)
        elif self.time_s - self._best[1] > STUCK_AFTER:
            return self._end("blocked")
        backwards = self.drive.kind == "move" and self.drive.amount < 0
        bearing = math.atan2(gy - y, gx - x) + (math.pi if backwards else 0.0)
        error = _wrap(bearing - self.body.angle)
        self.body.angular_velocity = max(-MAX_TURN, min(MAX_TURN, 4 * error))
        speed = min(MAX_SPEED, 1.5 * distance) if abs(error) < math.radians(20) else 0.0
        speed *= -1 if backwards else 1
        self.body.velocity = (speed * math.cos(self.body.angle), speed * math.sin(self.body.angle))
        return None

    def _end(self, status: str) -> Outcome:
        drive, self.drive = self.drive, None
        self._halt()
        return Outcome(drive.drive_id, status, self.state())

    def _halt(self) -> None:
        self.body.velocity = (0, 0)
        self.body.angular_velocity = 0

    def abandon(self) -> Outcome | None:
        """End the drive under way as timed out (the planner gave up on it)."""
        return self._end("timeout") if self.drive is not None else None

    # --- sensing -----------------------------------------------------------------------

    def state(self) -> RobotState:
        x, y = self.body.position
        return RobotState(round(x, 4), round(y, 4), round(math.degrees(_wrap(self.body.angle)), 2),
                          self.drive.drive_id if self.drive else "", round(self.time_s, 3))

    def camera(self, height: int = 96, width: int = 128) -> np.ndarray:
        """What the robot sees ahead: uint8 (height, width, 3)."""
        frame = np.empty((height, width, 3), np.uint8)
        frame[: height // 2] = SKY
        frame[height // 2:] = FLOOR
        origin = self.body.position
        focal = (width / 2) / math.tan(CAMERA_FOV / 2)
        for column in range(width):
            offset = math.atan((width / 2 - column - 0.5) / focal)
            angle = self.body.angle + offset
            end = (origin.x + CAMERA_RANGE * math.cos(angle), origin.y + CAMERA_RANGE * math.sin(angle))
            hit = self.space.segment_query_first(origin, end, 0.0, _SEEN)
            if hit is None:
                continue
            distance = max(0.05, hit.alpha * CAMERA_RANGE * math.cos(offset))
            colour = self.colours[hit.shape]
            if colour == WALL:  # walls darken with distance; places keep their colour
                colour = tuple(int(c * max(0.35, 1 - distance / 8)) for c in colour)
            half = min(height // 2, int(0.5 * focal / distance))
            top = height // 2 - (half if not hit.shape.sensor else 0)
            frame[top: height // 2 + half, column] = colour
        return frame


def _wrap(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi
