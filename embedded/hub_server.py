"""A local Hugging Face Hub: serves model folders over the endpoints `huggingface_hub` uses.

Enough of the Hub's HTTP API for the real client code path (`HfApi.repo_info`,
`list_repo_tree`, `hf_hub_download`, `snapshot_download`) and for this project's
streamed staging: revision resolution to a commit sha, the file tree with sizes, git blob
ids and LFS sha256, `resolve` downloads with ETag / X-Linked-Etag / X-Linked-Size headers
and HTTP Range, the Hub's error codes (RepoNotFound, RevisionNotFound, EntryNotFound,
GatedRepo), tokens for private repos, and injectable faults for tests (drop a connection
mid-file, serve bytes that do not match the advertised sha256, answer 5xx).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from embedded.net import free_port

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".h5", ".msgpack")
LFS_MIN_SIZE = 10 * 1024 * 1024
_CHUNK = 1 << 20


@dataclass(frozen=True)
class HubFile:
    path: str
    local: Path
    size: int
    sha256: str
    blob_id: str  # git blob sha1, what the Hub reports as `oid`
    lfs: bool

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


def _describe(folder: Path, rel: str) -> HubFile:
    local = folder / rel
    size = local.stat().st_size
    sha256 = hashlib.sha256()
    blob = hashlib.sha1(f"blob {size}\0".encode())
    with local.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            sha256.update(chunk)
            blob.update(chunk)
    lfs = rel.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE
    return HubFile(rel, local, size, sha256.hexdigest(), blob.hexdigest(), lfs)


@dataclass
class HubRepo:
    """One model repo: a folder served as the `main` branch at a content-derived commit sha."""

    folder: Path
    token: str | None = None  # private/gated: requests must carry this bearer token
    files: dict[str, HubFile] = field(init=False)
    sha: str = field(init=False)
    refs: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        rels = sorted(p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file())
        rels = [r for r in rels if not r.split("/")[-1].startswith(".")]
        self.files = {r: _describe(self.folder, r) for r in rels}
        digest = hashlib.sha1("".join(f"{f.path}\0{f.etag}\n" for f in self.files.values()).encode())
        self.sha = digest.hexdigest()
        self.refs = {"main": self.sha}

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return self.sha if revision == self.sha else None


@dataclass
class Faults:
    """Failures the server injects: {path: how many more times} (-1: every time)."""

    drop_mid_file: dict[str, int] = field(default_factory=dict)  # close the connection at the file's middle byte
    corrupt: dict[str, int] = field(default_factory=dict)  # flip a byte, keep the advertised sha256
    error_5xx: dict[str, int] = field(default_factory=dict)  # answer 503


class LocalHub:
    """A threaded Hub server on 127.0.0.1; use as a context manager or call start()/stop()."""

    def __init__(self, repos: dict[str, HubRepo], port: int | None = None):
        self.repos = repos
        self.faults = Faults()
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for tests
        self.bytes_served = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port or free_port()), _make_handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "LocalHub":
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def inject(self, kind: str, path: str, times: int = 1) -> None:
        with self._lock:
            getattr(self.faults, kind)[path] = times

    def take_fault(self, kind: str, path: str) -> bool:
        with self._lock:
            left: dict[str, int] = getattr(self.faults, kind)
            n = left.get(path, 0)
            if n == 0:
                return False
            if n > 0:
                left[path] = n - 1
            return True


_API = re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)/(?P<kind>revision|tree)/(?P<rest>.+)$")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+|[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def _make_handler(hub: LocalHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        # -- helpers -------------------------------------------------------
        def _json(self, status: int, body, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, status: int, code: str | None, message: str) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._json(status, {"error": message}, headers)

        def _repo(self, repo_id: str) -> HubRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            if repo.token is not None:
                auth = self.headers.get("Authorization", "")
                if not auth:
                    self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it and be authenticated to access it.")
                    return None
                if auth != f"Bearer {repo.token}":
                    self._error(401, None, "Invalid credentials in Authorization header")
                    return None
            return repo

        # -- routes ----------------------------------------------------------
        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            path = unquote(url.path)
            with hub._lock:
                hub.requests.append((self.command, path))
            if m := _RESOLVE.match(path):
                return self._resolve(m["repo"], unquote(m["rev"]), m["path"])
            if m := _API.match(path):
                repo = self._repo(m["repo"])
                if repo is None:
                    return
                rest = m["rest"]
                if m["kind"] == "revision":
                    return self._revision(m["repo"], repo, rest, parse_qs(url.query))
                revision, _, sub = rest.partition("/")
                return self._tree(repo, unquote(revision), sub, parse_qs(url.query))
            if m := _INFO.match(path):
                repo = self._repo(m["repo"])
                if repo is not None:
                    self._revision(m["repo"], repo, "main", parse_qs(url.query))
                return
            self._error(404, None, f"no route for {path}")

        def _revision(self, repo_id: str, repo: HubRepo, revision: str, query) -> None:
            sha = repo.resolve(revision)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = []
            for f in repo.files.values():
                entry: dict = {"rfilename": f.path}
                if blobs:
                    entry.update(size=f.size, blobId=f.blob_id)
                    if f.lfs:
                        entry["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
                siblings.append(entry)
            self._json(200, {
                "_id": sha, "id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.token is not None,
                "gated": False, "disabled": False, "siblings": siblings, "tags": [], "downloads": 0, "likes": 0,
            })

        def _tree(self, repo: HubRepo, revision: str, sub: str, query) -> None:
            if repo.resolve(revision) is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            prefix = unquote(sub).strip("/")
            prefix = prefix + "/" if prefix else ""
            entries, dirs = [], set()
            for f in repo.files.values():
                if not f.path.startswith(prefix):
                    continue
                rest = f.path[len(prefix):]
                parts = rest.split("/")
                for i in range(1, len(parts)):
                    if recursive or i == 1:
                        dirs.add(prefix + "/".join(parts[:i]))
                if recursive or len(parts) == 1:
                    e = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
                    if f.lfs:
                        e["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
                    entries.append(e)
            entries += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d} for d in sorted(dirs)]
            self._json(200, entries)

        def _resolve(self, repo_id: str, revision: str, rel: str) -> None:
            repo = self._repo(repo_id)
            if repo is None:
                return
            sha = repo.resolve(revision)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            f = repo.files.get(rel)
            if f is None:
                return self._error(404, "EntryNotFound", f"{rel} does not exist on {revision}")
            if self.command == "GET" and hub.take_fault("error_5xx", rel):
                return self._error(503, None, "Service Unavailable (injected)")
            start, end = 0, f.size - 1
            status = 200
            rng = self.headers.get("Range")
            if rng and (m := re.match(r"bytes=(\d*)-(\d*)$", rng.strip())):
                if m[1]:
                    start = int(m[1])
                    end = min(int(m[2]), f.size - 1) if m[2] else f.size - 1
                else:
                    start = max(0, f.size - int(m[2]))
                if start > end or start >= f.size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{f.size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            length = end - start + 1
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("X-Repo-Commit", sha)
            self.send_header("ETag", f'"{f.etag}"')
            if f.lfs:
                self.send_header("X-Linked-Etag", f'"{f.sha256}"')
                self.send_header("X-Linked-Size", str(f.size))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{f.size}")
            self.end_headers()
            if self.command == "HEAD":
                return
            middle = f.size // 2  # a dropped connection breaks off at the file's middle byte
            drop = start <= middle <= end and hub.take_fault("drop_mid_file", rel)
            corrupt = hub.take_fault("corrupt", rel)
            self._send_bytes(f, start, length, middle - start if drop else length, drop, corrupt)

        def _send_bytes(self, f: HubFile, start: int, length: int, limit: int, drop: bool, corrupt: bool) -> None:
            sent = 0
            with f.local.open("rb") as src:
                if limit > 0 and not corrupt:  # the kernel copies file to socket (sendfile): the Hub's CPU stays out of benchmarks
                    self.wfile.flush()
                    sent = self.connection.sendfile(src, offset=start, count=limit)
                src.seek(start + sent)
                while sent < limit:
                    chunk = src.read(min(_CHUNK, limit - sent))
                    if not chunk:
                        break
                    if corrupt and sent == 0:
                        chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                    self.wfile.write(chunk)
                    sent += len(chunk)
            with hub._lock:
                hub.bytes_served += sent
            if drop:
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)

    return Handler


def main() -> None:  # pragma: no cover - interactive helper
    parser = argparse.ArgumentParser(description="Serve model folders as a local Hugging Face Hub.")
    parser.add_argument("--repo", action="append", required=True, metavar="OWNER/NAME=FOLDER")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    repos = {}
    for spec in args.repo:
        repo_id, _, folder = spec.partition("=")
        repos[repo_id] = HubRepo(Path(folder))
    hub = LocalHub(repos, port=args.port or None)
    print(f"HF_ENDPOINT={hub.endpoint}", flush=True)
    try:
        hub._server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
