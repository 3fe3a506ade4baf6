"""What every way of fetching a model shares: the progress callback and the error.

Kept apart from :mod:`mofa_omni.models.store` so that the fetchers the store calls
(:mod:`mofa_omni.models.hub`) and the converters adapters call (:mod:`mofa_omni.formats`)
need not import the store.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from mofa_omni.contract.errors import ServerError

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class FetchError(ServerError):
    """A source that cannot be fetched (no network, unknown package, missing file)."""


def no_progress(stage: str, done: int, total: int) -> None:
    pass


def tqdm_progress() -> Progress:
    """A Progress callback drawing one tqdm bar (bytes) per stage on stderr."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            in_bytes = total >= 1 << 16  # small totals count items (tensors, files), not bytes
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="B" if in_bytes else "it",
                                     unit_scale=in_bytes, unit_divisor=1024, leave=True,
                                     file=sys.stderr)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update
