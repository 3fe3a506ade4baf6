"""The JSON files checkpoints describe themselves with (config.json, model_index.json, ...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mofa_omni.contract.errors import ModelLoadError, OmniError


def read_json_object(path: Path, error: type[OmniError] = ModelLoadError) -> dict[str, Any]:
    """The JSON object in ``path``; ``error`` (a load error by default) naming the file when it
    is missing, unreadable, or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as problem:
        raise error(f"{path} is unreadable: {problem}") from None
    if not isinstance(value, dict):
        raise error(f"{path} is not a JSON object")
    return value
