"""The robot's world: an arena with named places, some of them hazards (pure geometry).

Positions are metres in the arena's frame (x right, y up); headings are degrees
counter-clockwise from +x. Every place has a colour, which is how the robot's
camera tells places apart (:mod:`mofa_omni.robot.vision`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

ROBOT_RADIUS = 0.2
ARRIVAL_GAP = 0.15  # the robot stops this far from a place's edge


@dataclass(frozen=True, slots=True)
class Place:
    name: str
    x: float
    y: float
    radius: float
    colour: tuple[int, int, int]
    hazard: str = ""  # why the robot must not go there ("" = safe)
    solid: bool = True  # an obstacle the robot bumps into (a hazard zone is not)


@dataclass(frozen=True, slots=True)
class World:
    width: float
    height: float
    places: tuple[Place, ...]
    start: tuple[float, float, float]  # x, y, heading

    def find(self, spoken: str) -> Place | None:
        """The place a spoken name refers to ("the Red Ball", "red ball." → red ball), or None."""
        words = _words(spoken)
        for place in self.places:
            if _words(place.name) == words:
                return place
        # "the ball" / "blue" name one place when only one place's name has those words
        matches = [p for p in self.places if words and set(words) <= set(_words(p.name))]
        return matches[0] if len(matches) == 1 else None

    def goal_for(self, place: Place, x: float, y: float) -> tuple[float, float]:
        """Where the robot stops to be at ``place``: on the line from (x, y), just short of it."""
        distance = math.hypot(place.x - x, place.y - y)
        if not place.solid:
            return place.x, place.y
        keep = place.radius + ROBOT_RADIUS + ARRIVAL_GAP
        if distance <= keep:
            return x, y
        t = (distance - keep) / distance
        return x + (place.x - x) * t, y + (place.y - y) * t

    def hazard_on_path(self, x0: float, y0: float, x1: float, y1: float) -> Place | None:
        """The first hazard the robot's body would touch driving straight from (x0, y0) to (x1, y1)."""
        for place in self.places:
            if place.hazard and _segment_distance(place.x, place.y, x0, y0, x1, y1) < \
                    place.radius + ROBOT_RADIUS:
                return place
        return None

    def inside(self, x: float, y: float) -> bool:
        return (ROBOT_RADIUS <= x <= self.width - ROBOT_RADIUS
                and ROBOT_RADIUS <= y <= self.height - ROBOT_RADIUS)


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in ("the", "a", "an")]


def _segment_distance(px: float, py: float, x0: float, y0: float, x1: float, y1: float) -> float:
    dx, dy = x1 - x0, y1 - y0
    length2 = dx * dx + dy * dy
    t = 0.0 if length2 == 0 else max(0.0, min(1.0, ((px - x0) * dx + (py - y0) * dy) / length2))
    return math.hypot(px - (x0 + t * dx), py - (y0 + t * dy))


# A 6 m x 4 m room: the robot starts in the middle facing +x; the lava pit sits between it and
# the far corner, so "the blue box" is reachable but "the lava pit" is not.
DEFAULT_WORLD = World(
    width=6.0, height=4.0,
    start=(3.0, 2.0, 0.0),
    places=(
        Place("red ball", 5.2, 3.2, 0.2, (220, 40, 40)),
        Place("blue box", 0.8, 3.2, 0.3, (40, 80, 220)),
        Place("charging dock", 0.8, 0.7, 0.3, (40, 190, 70)),
        Place("lava pit", 4.9, 0.9, 0.45, (255, 140, 0), hazard="it is a hazard zone", solid=False),
    ),
)
