"""A loopback server speaking the part of the Hugging Face Hub protocol that huggingface_hub's
download code uses, so the store's hub path runs for real without a network.

Routes (all repos are model repos)::

    GET  /api/models/{org}/{name}[/revision/{rev}]   repo info: sha, siblings
    GET  /api/models/{org}/{name}/tree/{rev}[/path]  file listing (one page)
    HEAD /{org}/{name}/resolve/{rev}/{file}          X-Repo-Commit, ETag, Content-Length
    GET  /{org}/{name}/resolve/{rev}/{file}          the bytes; ``Range: bytes=N-`` gives 206

Errors are 404s with the ``X-Error-Code`` the Hub sends (RepoNotFound, RevisionNotFound,
EntryNotFound), which huggingface_hub maps to its exception classes. ``interrupt`` cuts a
file's next download short to test resuming. Every request is recorded in ``log``.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    range: str | None  # the Range header, as sent
    status: int


@dataclass(slots=True)
class _Cut:
    after: int  # bytes sent before the connection is closed
    then_fail: int  # how many later requests for the file get a 503


@dataclass(slots=True)
class _Repo:
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit sha
    commits: dict[str, dict[str, Path | bytes]] = field(default_factory=dict)  # sha -> files


class LocalHub:
    """A Hub on 127.0.0.1 holding the repos a test registers with :meth:`add`."""

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.log: list[Request] = []
        self._cuts: dict[tuple[str, str], _Cut] = {}
        self._lock = threading.Lock()
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def add(self, repo: str, files: dict[str, Path | bytes], revision: str = "main") -> str:
        """Commit ``files`` (name -> bytes, or a file on disk) to ``repo`` as ``revision``;
        returns the commit sha (which also works as a revision)."""
        digest = hashlib.sha1(repo.encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + _sha256(files[name]).encode())
        sha = digest.hexdigest()
        with self._lock:
            entry = self.repos.setdefault(repo, _Repo())
            entry.commits[sha] = dict(files)
            entry.refs[revision] = sha
        return sha

    def interrupt(self, repo: str, filename: str, after: int, then_fail: int = 0) -> None:
        """The next GET of ``filename`` sends ``after`` bytes and drops the connection; the
        ``then_fail`` requests for it after that are answered 503 (an outage)."""
        self._cuts[(repo, filename)] = _Cut(after, then_fail)

    def requests(self, filename: str, method: str = "GET") -> list[Request]:
        return [r for r in self.log if r.method == method and r.path.endswith(f"/{filename}")]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- lookups used by the handler ---------------------------------------------------

    def _commit(self, repo: str, rev: str) -> tuple[int, str, str]:
        """(200, "", commit sha) or (404, error code, message)."""
        entry = self.repos.get(repo)
        if entry is None:
            return 404, "RepoNotFound", f"Repository {repo} not found"
        sha = entry.refs.get(rev) or (rev if rev in entry.commits else None)
        if sha is None:
            return 404, "RevisionNotFound", f"Invalid rev id: {rev}"
        return 200, "", sha

    def _cut(self, repo: str, filename: str) -> _Cut | None:
        with self._lock:
            cut = self._cuts.get((repo, filename))
            if cut is None:
                return None
            if cut.after >= 0:
                self._cuts[(repo, filename)] = _Cut(-1, cut.then_fail)
                return _Cut(cut.after, 0)
            if cut.then_fail > 0:
                self._cuts[(repo, filename)] = _Cut(-1, cut.then_fail - 1)
                return cut
            del self._cuts[(repo, filename)]
            return None


def _sha256(data: Path | bytes) -> str:
    return hashlib.sha256(data.read_bytes() if isinstance(data, Path) else data).hexdigest()


def _size(data: Path | bytes) -> int:
    return data.stat().st_size if isinstance(data, Path) else len(data)


class _Handler(BaseHTTPRequestHandler):
    server_hub: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # quiet: the hub keeps its own log
        pass

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    def _route(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        hub = self.server_hub
        if match := _RESOLVE.match(path):
            self._resolve(match["repo"], match["rev"], match["file"], body)
        elif match := _TREE.match(path):
            status, code, found = hub._commit(match["repo"], match["rev"])
            if status != 200:
                return self._error(status, code, str(found))
            files = hub.repos[match["repo"]].commits[str(found)]
            prefix = (match["path"] or "").strip("/")
            self._json([{"type": "file", "path": name, "size": _size(data),
                         "oid": hashlib.sha1(_sha256(data).encode()).hexdigest()}
                        for name, data in sorted(files.items())
                        if not prefix or name.startswith(prefix + "/")])
        elif match := _INFO.match(path):
            status, code, found = hub._commit(match["repo"], match["rev"] or "main")
            if status != 200:
                return self._error(status, code, str(found))
            files = hub.repos[match["repo"]].commits[str(found)]
            self._json({"id": match["repo"], "modelId": match["repo"], "sha": found,
                        "private": False, "disabled": False, "gated": False, "tags": [],
                        "siblings": [{"rfilename": name} for name in sorted(files)]})
        else:
            self._error(404, "", f"no route for {path}")

    def _resolve(self, repo: str, rev: str, filename: str, body: bool) -> None:
        hub = self.server_hub
        status, code, found = hub._commit(repo, rev)
        if status != 200:
            return self._error(status, code, str(found))
        sha = str(found)
        data = hub.repos[repo].commits[sha].get(filename)
        if data is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist at {rev}",
                               commit=sha)
        size, etag = _size(data), _sha256(data)
        cut = hub._cut(repo, filename) if body else None
        if cut is not None and cut.after < 0:
            return self._error(503, "", "the hub is down for a moment")
        start = 0
        requested = self.headers.get("Range")
        if requested and (match := re.fullmatch(r"bytes=(\d+)-", requested.strip())):
            start = int(match[1])
        status = 206 if requested and 0 < start < size else 200
        start = start if status == 206 else 0
        self._record(status)
        self.send_response(status)
        self.send_header("X-Repo-Commit", sha)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(size - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        if not body:
            return
        payload = data.read_bytes() if isinstance(data, Path) else data
        if cut is not None:  # send part of it, then drop the connection mid-body
            self.wfile.write(payload[start:start + cut.after])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(payload[start:])

    def _json(self, value: object) -> None:
        data = json.dumps(value).encode()
        self._record(200)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str, commit: str = "") -> None:
        data = json.dumps({"error": message}).encode()
        self._record(status)
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _record(self, status: int) -> None:
        self.server_hub.log.append(
            Request(self.command, unquote(urlsplit(self.path).path), self.headers.get("Range"),
                    status))
