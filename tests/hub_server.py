"""A small in-memory Hugging Face Hub on 127.0.0.1, enough for `push_to_hub` and `from_pretrained` of model repos.

It answers the endpoints huggingface_hub 2.4 uses (found by running its push and download against a logging server):
create a repo, preupload (every file "regular", i.e. inline in the commit), commit (NDJSON with base64
files), validate YAML, repo info, file tree, and `resolve` (HEAD/GET) with `X-Repo-Commit` and `ETag`; model repos
in `repos`, Space repos (`repo_type="space"`) in `spaces`.
Bounded: loopback only, request bodies up to `MAX_BODY_BYTES`, and it shuts itself down after
`lifetime_s` seconds even if nobody stops it. Usage:

    with FakeHub() as hub:
        env = {"HF_ENDPOINT": hub.url}   # set before huggingface_hub is imported, in a child process
"""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

MAX_BODY_BYTES = 64 * 1024 * 1024
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


class Repo:
    """One model repo: commits as full snapshots (small test repos), newest last."""

    def __init__(self, repo_id: str):
        self.repo_id = repo_id
        self.snapshots = {}  # commit sha -> {path: bytes}
        self.head = self._commit({}, "initial commit")

    def _commit(self, files: dict, message: str) -> str:
        sha = hashlib.sha1(json.dumps([self.repo_id, len(self.snapshots), message, sorted(files)]).encode()).hexdigest()
        self.snapshots[sha] = files
        return sha

    def commit(self, added: dict, deleted: set, message: str) -> str:
        files = {path: data for path, data in self.snapshots[self.head].items() if path not in deleted}
        files.update(added)
        self.head = self._commit(files, message)
        return self.head

    def resolve(self, revision: str):
        """(sha, files) of a branch name ("main") or a commit sha; None if unknown."""
        sha = self.head if revision == "main" else revision
        return (sha, self.snapshots[sha]) if sha in self.snapshots else None


class FakeHub:
    """The server: `url`, the `repos` it holds, the `requests` seen and every `Authorization` header received."""

    def __init__(self, lifetime_s: float = 300.0):
        self.repos = {}
        self.spaces = {}  # Space repos: the same commits, under /api/spaces/... and /spaces/.../resolve/...
        self.authorizations = []
        self.requests = []
        self.unrouted = []  # requests this fake does not know: a test should assert there are none
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True

    def start(self) -> "FakeHub":
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _handler_for(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        # ---------------------------------------------------------------------------------- plumbing
        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                raise ValueError(f"request body of {length} bytes exceeds {MAX_BODY_BYTES}")
            return self.rfile.read(length)

        def _send(self, status: int, body: bytes = b"", headers: dict = None, content_type: str = "application/json"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, payload, status: int = 200, headers: dict = None):
            self._send(status, json.dumps(payload).encode(), headers)

        def _error(self, status: int, code: str, message: str):
            self._json({"error": message}, status, {"X-Error-Code": code, "X-Error-Message": message})

        def _route(self):
            path = unquote(urlsplit(self.path).path)
            with hub._lock:
                hub.requests.append(f"{self.command} {path}")
                if "Authorization" in self.headers:
                    hub.authorizations.append(self.headers["Authorization"])
            for method, pattern, action in ROUTES:
                match = re.fullmatch(pattern, path)
                if method == self.command and match:
                    try:
                        with hub._lock:
                            return action(self, **match.groupdict())
                    except ValueError as error:
                        return self._error(400, "BadRequest", str(error))
            with hub._lock:
                hub.unrouted.append(f"{self.command} {path}")
            # An unread request body would corrupt the next request on this connection: close it.
            self.close_connection = True
            self._error(404, "EntryNotFound", f"no route for {self.command} {path}")

        do_GET = do_HEAD = do_POST = _route

        # ---------------------------------------------------------------------------------- endpoints
        def create_repo(self):
            request = json.loads(self._body())
            repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
            if "/" not in repo_id:
                raise ValueError("this fake Hub needs a namespaced repo id ('user/repo')")
            kind = request.get("type") or "model"
            if kind not in ("model", "space"):
                raise ValueError(f"this fake Hub holds model and space repos, not {kind!r}")
            repos = hub.spaces if kind == "space" else hub.repos
            if kind == "space" and request.get("sdk") not in ("gradio", "streamlit", "docker", "static"):
                raise ValueError(f"a Space needs an sdk, got {request.get('sdk')!r}")
            if repo_id in repos:
                return self._error(409, "RepoExists", f"You already created this {kind} repo: {repo_id}")
            repos[repo_id] = Repo(repo_id)
            self._json({"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def validate_yaml(self):
            self._body()
            self._json({"errors": [], "warnings": []})

        def _repo(self, repo: str, kind: str = "models"):
            repos = hub.spaces if kind == "spaces" else hub.repos
            if repo not in repos:
                self._error(404, "RepoNotFound", f"Repository Not Found for url: {hub.url}/{repo}")
                return None
            return repos[repo]

        def preupload(self, repo: str, revision: str, kind: str = "models"):
            files = json.loads(self._body())["files"]
            if self._repo(repo, kind):
                self._json(
                    {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
                )

        def commit(self, repo: str, revision: str, kind: str = "models"):
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            repository = self._repo(repo, kind)
            if not repository:
                return
            added, deleted, message = {}, set(), ""
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "header":
                    message = value["summary"]
                elif key == "file":
                    added[value["path"]] = base64.b64decode(value["content"])
                elif key in ("deletedFile", "deletedFolder"):
                    deleted.add(value["path"])
                else:
                    raise ValueError(f"unsupported commit operation {key!r} (this fake Hub takes inline files only)")
            sha = repository.commit(added, deleted, message)
            self._json({"success": True, "commitOid": sha, "commitUrl": f"{hub.url}/{repo}/commit/{sha}"})

        def model_info(self, repo: str, revision: str = "main"):
            repository = self._repo(repo)
            if not repository:
                return
            resolved = repository.resolve(revision)
            if resolved is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            sha, files = resolved
            self._json(
                {
                    "id": repo,
                    "modelId": repo,
                    "sha": sha,
                    "private": False,
                    "tags": [],
                    "siblings": [{"rfilename": p} for p in sorted(files)],
                }
            )

        def tree(self, repo: str, revision: str, folder: str = ""):
            repository = self._repo(repo)
            if not repository:
                return
            resolved = repository.resolve(revision)
            if resolved is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            folder = (folder or "").strip("/")
            prefix = f"{folder}/" if folder else ""
            entries, folders = [], set()
            for path, data in sorted(resolved[1].items()):
                if not path.startswith(prefix):
                    continue
                parts = path.split("/")
                folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
                entries.append({"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()})
            entries += [
                {"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0}
                for f in sorted(folders)
                if f.startswith(prefix)
            ]
            self._json(entries)

        def resolve(self, repo: str, revision: str, file: str):
            repository = self._repo(repo)
            if not repository:
                return
            resolved = repository.resolve(revision)
            if resolved is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            sha, files = resolved
            if file not in files:
                return self._error(404, "EntryNotFound", f"Entry not found: {file}")
            data = files[file]
            etag = f'"{hashlib.sha1(data).hexdigest()}"'
            self._send(200, data, {"X-Repo-Commit": sha, "ETag": etag}, content_type="application/octet-stream")

    ROUTES = [
        ("POST", r"/api/repos/create", Handler.create_repo),
        ("POST", r"/api/validate-yaml", Handler.validate_yaml),
        ("POST", rf"/api/(?P<kind>models|spaces)/{REPO}/preupload/(?P<revision>[^/]+)", Handler.preupload),
        ("POST", rf"/api/(?P<kind>models|spaces)/{REPO}/commit/(?P<revision>[^/]+)", Handler.commit),
        ("GET", rf"/api/models/{REPO}", Handler.model_info),
        ("GET", rf"/api/models/{REPO}/revision/(?P<revision>[^/]+)", Handler.model_info),
        ("GET", rf"/api/models/{REPO}/tree/(?P<revision>[^/]+)(?:/(?P<folder>.*))?", Handler.tree),
        ("HEAD", rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<file>.+)", Handler.resolve),
        ("GET", rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<file>.+)", Handler.resolve),
    ]
    return Handler
