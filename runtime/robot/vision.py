"""What the robot's camera frame shows: which places are in view, and where (pure)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import validate_image
from mofa_omni.robot.world import World

MIN_PIXELS = 12  # fewer pixels of a place's colour than this is noise, not a sighting


@dataclass(frozen=True, slots=True)
class Sighting:
    name: str
    side: str  # "on the left", "ahead", "on the right"
    share: float  # of the frame's pixels: larger is closer


def sightings(frame: np.ndarray, world: World) -> list[Sighting]:
    """The world's places visible in ``frame`` (uint8 HWC RGB), the largest first."""
    frame = validate_image(frame, what="camera frame")
    if frame.shape[2] < 3:
        raise ContractError(f"camera frame: needs 3 or 4 channels, got {frame.shape[2]}")
    rgb = frame[..., :3]
    width = rgb.shape[1]
    found = []
    for place in world.places:
        mask = np.all(rgb == np.asarray(place.colour, np.uint8), axis=-1)
        count = int(mask.sum())
        if count < MIN_PIXELS:
            continue
        centre = float(np.nonzero(mask)[1].mean()) / width
        side = "on the left" if centre < 0.35 else "on the right" if centre > 0.65 else "ahead"
        found.append(Sighting(place.name, side, count / mask.size))
    return sorted(found, key=lambda s: -s.share)


def describe(found: list[Sighting]) -> str:
    """A sentence for the LLM's context: "The camera sees the red ball ahead." """
    if not found:
        return "The camera sees no known place."
    return "The camera sees " + ", ".join(f"the {s.name} {s.side}" for s in found) + "."
