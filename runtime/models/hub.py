"""Fetching a catalog entry's Hugging Face Hub source, resumably.

huggingface_hub's ``snapshot_download`` deletes a half-downloaded file when an attempt fails,
so a large checkpoint cut off at 90 % starts over. Here each file is downloaded with the
library's own HTTP code (``get_hf_file_metadata`` + ``http_get``, which send its headers and
follow its redirects) into ``<partial>/<commit>/<file>.incomplete``, a place that outlives a
failed attempt: the next attempt asks for the remaining bytes with a ``Range`` request.

The endpoint is ``$HF_ENDPOINT`` as set when the fetch runs (huggingface_hub reads it only
once, at import), else huggingface.co. No token is sent unless huggingface_hub finds one.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from mofa_omni.models.catalog import HubSource
from mofa_omni.models.fetching import FetchError, Progress


def hub_endpoint() -> str:
    """The Hub's address: ``$HF_ENDPOINT`` now (a mirror, a test's server), else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def fetch_hub(source: HubSource, out: Path, partial: Path, progress: Progress) -> None:
    """Download ``source``'s files (all of the revision's when ``files`` is empty; names may
    be glob patterns) into ``out``, keeping unfinished files under ``partial`` for a retry.

    Raises FetchError naming the repo, revision or file for a missing repo, revision or file
    and for a network failure (after which the next call resumes)."""
    from huggingface_hub import HfApi

    endpoint = hub_endpoint()
    where = f"{source.repo}@{source.revision} on {endpoint}"
    with _hub_errors(source, where):
        info = HfApi(endpoint=endpoint).model_info(source.repo, revision=source.revision)
    commit = info.sha or source.revision
    names = wanted_files(source, [s.rfilename for s in info.siblings or ()], where)
    for name in names:
        with _hub_errors(source, where, name):
            _download(source.repo, commit, name, endpoint, out / name,
                      partial / commit / f"{name}.incomplete", progress)
    shutil.rmtree(partial, ignore_errors=True)  # with any other commit's leftovers


def wanted_files(source: HubSource, available: list[str], where: str) -> list[str]:
    """The repo's files named by ``source.files`` (each a name or a glob pattern)."""
    unsafe = [name for name in available if Path(name).is_absolute() or ".." in Path(name).parts]
    if unsafe:  # a file must land inside the source folder
        raise FetchError(f"Hugging Face repository {where} lists unsafe file names: {unsafe[:3]}")
    if not source.files:
        if not available:
            raise FetchError(f"Hugging Face repository {where} has no files")
        return sorted(available)
    chosen: set[str] = set()
    for pattern in source.files:
        matched = fnmatch.filter(available, pattern)
        if not matched:
            listing = ", ".join(sorted(available)[:20]) or "no files"
            raise FetchError(f"Hugging Face repository {where} has no file {pattern!r} "
                             f"(it has: {listing})")
        chosen.update(matched)
    return sorted(chosen)


def _download(repo: str, commit: str, name: str, endpoint: str, target: Path, part: Path,
              progress: Progress) -> None:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    meta = get_hf_file_metadata(hf_hub_url(repo, name, revision=commit, endpoint=endpoint),
                                endpoint=endpoint)
    part.parent.mkdir(parents=True, exist_ok=True)
    with part.open("ab") as file:
        have = file.tell()
        if meta.size is not None and have > meta.size:  # not a prefix of this file: start over
            file.truncate(0)
            have = 0
        http_get(meta.location, file, resume_size=have, expected_size=meta.size,
                 headers=build_hf_headers(), tqdm_class=_progress_bars(progress, name))
    target.parent.mkdir(parents=True, exist_ok=True)
    part.replace(target)


def _progress_bars(progress: Progress, name: str) -> type:
    """A tqdm stand-in that huggingface_hub's ``http_get`` drives, reporting to ``progress``
    (the store's callback: one "download NAME" stage in bytes, resumed bytes counted done)."""

    class Bar:
        def __init__(self, *, total: int | None = None, initial: int = 0, **_: object):
            self.total, self.done = total or 0, initial
            progress(f"download {name}", self.done, self.total)

        def update(self, n: int = 1) -> None:
            self.done += n
            progress(f"download {name}", self.done, max(self.total, self.done))

        def close(self) -> None:
            pass

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    return Bar


@contextlib.contextmanager
def _hub_errors(source: HubSource, where: str, name: str = "") -> Iterator[None]:
    """Turns huggingface_hub's and the network's exceptions into one FetchError line naming
    the repo, revision and file, instead of a traceback through the library's internals."""
    try:
        yield
    except FetchError:
        raise
    except Exception as error:
        raise FetchError(_explain(error, source, where, name)) from error


def _explain(error: Exception, source: HubSource, where: str, name: str) -> str:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, revision = source.repo, source.revision
    if isinstance(error, GatedRepoError):
        return f"Hugging Face repository {repo!r} is gated: accept its terms and log in"
    if isinstance(error, RevisionNotFoundError):
        return f"Hugging Face repository {repo!r} has no revision {revision!r}"
    if isinstance(error, RepositoryNotFoundError):
        return f"Hugging Face repository {repo!r} does not exist at {hub_endpoint()} (or is private)"
    if isinstance(error, EntryNotFoundError):
        return f"Hugging Face repository {where} has no file {name!r}"
    if isinstance(error, OfflineModeIsEnabled):
        return f"cannot fetch {where}: HF_HUB_OFFLINE is set"
    detail = str(error).splitlines()[0] if str(error) else ""
    file = f" downloading {name}" if name else ""
    return (f"cannot fetch {where}{file}: {type(error).__name__}: {detail} (is there a network? "
            "a download cut off part-way resumes on the next fetch)")
