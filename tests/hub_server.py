"""A local stand-in for the Hugging Face Hub's HTTP API, enough for ``snapshot_download`` (no network).

Serves one model repository from memory, the endpoints huggingface_hub 0.2x-2.x call:

    GET  /api/models/{repo}/revision/{rev}      repo_info: sha (the commit) and siblings
    GET  /api/models/{repo}/tree/{rev}[/path]   list_repo_tree: files with size, oid, and lfs for *.safetensors
    HEAD /{repo}/resolve/{rev}/{file}           file metadata: X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{rev}/{file}           the bytes, honouring ``Range: bytes=N-`` (resumed downloads)

Unknown repositories, revisions and files answer 404 with the Hub's ``X-Error-Code``. ``gets`` counts the file
downloads per path, so a test can tell what a second run fetched again.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class HubRepo:
    """A repository: files by path, one commit, branch ``main`` and any tags pointing at it."""

    def __init__(self, repo_id: str, files: dict[str, bytes], tags: tuple[str, ...] = ()):
        self.repo_id, self.files = repo_id, files
        digest = hashlib.sha1(b"".join(k.encode() + hashlib.sha1(v).digest() for k, v in sorted(files.items())))
        self.sha = digest.hexdigest()
        self.refs = {"main": self.sha, self.sha: self.sha, **{t: self.sha for t in tags}}

    @classmethod
    def from_folder(cls, repo_id: str, folder: Path, tags: tuple[str, ...] = ()) -> HubRepo:
        files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return cls(repo_id, files, tags)

    def entry(self, path: str) -> dict:
        data = self.files[path]
        out = {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
        if path.endswith(".safetensors"):
            out["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return out

    def etag(self, path: str) -> str:
        e = self.entry(path)
        return e["lfs"]["oid"] if "lfs" in e else e["oid"]


class _Handler(BaseHTTPRequestHandler):
    server: HubServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def _error(self, code: str, status: int = 404) -> None:
        body = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route(self) -> tuple[str, HubRepo, str, str] | None:
        """(kind, repo, revision, rest) of the request path, or None after answering 404."""
        repo = self.server.repo
        path = unquote(urlparse(self.path).path)
        for kind, prefix in (
            ("revision", f"/api/models/{repo.repo_id}/revision/"),
            ("tree", f"/api/models/{repo.repo_id}/tree/"),
            ("resolve", f"/{repo.repo_id}/resolve/"),
        ):
            if path.startswith(prefix):
                rev, _, rest = path[len(prefix) :].partition("/")
                if rev not in repo.refs:
                    self._error("RevisionNotFound")
                    return None
                return kind, repo, rev, rest
        self._error("RepoNotFound", 401)  # what the Hub answers for a missing (or private) repository
        return None

    def do_GET(self) -> None:
        route = self._route()
        if route is None:
            return
        kind, repo, _, rest = route
        if kind == "revision":
            self._json(
                {
                    "id": repo.repo_id,
                    "modelId": repo.repo_id,
                    "sha": repo.sha,
                    "private": False,
                    "siblings": [{"rfilename": p, "size": len(d)} for p, d in sorted(repo.files.items())],
                }
            )
        elif kind == "tree":
            self._json([repo.entry(p) for p in sorted(repo.files) if p.startswith(rest)])
        else:
            self._file(repo, rest, head=False)

    def do_HEAD(self) -> None:
        route = self._route()
        if route is None:
            return
        kind, repo, _, rest = route
        if kind != "resolve":
            self._error("NotFound")
            return
        self._file(repo, rest, head=True)

    def _file(self, repo: HubRepo, path: str, head: bool) -> None:
        data = repo.files.get(path)
        if data is None:
            self._error("EntryNotFound")
            return
        start = 0
        wanted = self.headers.get("Range", "")
        if not head and wanted.startswith("bytes="):
            start = int(wanted[len("bytes=") :].split("-")[0] or 0)
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", repo.sha)
        self.send_header("ETag", f'"{repo.etag(path)}"')
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not head:
            self.server.gets[path] += 1
            self.wfile.write(data[start:])


class HubServer(ThreadingHTTPServer):
    """The server on 127.0.0.1 and a free port, in a daemon thread; ``url`` is its HF_ENDPOINT."""

    daemon_threads = True

    def __init__(self, repo: HubRepo):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repo = repo
        self.gets: Counter[str] = Counter()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
