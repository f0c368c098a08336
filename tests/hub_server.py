"""A local stand-in for the Hugging Face Hub: the few API endpoints `huggingface_hub` calls to push a folder.

    with HubServer(token="hf_test") as hub:          # 127.0.0.1, a free port, a daemon thread
        HfApi(endpoint=hub.url, token="hf_test").create_repo("me/model", private=True)
        hub.repos["me/model"]                         # {"private": True, "branches": {"main": {path: bytes}}, ...}

Endpoints (as huggingface_hub 1.x-2.x calls them): GET /api/whoami-v2, POST /api/repos/create, POST
/api/validate-yaml, POST /api/models/<repo>/branch/<branch>, POST /api/models/<repo>/preupload/<revision> (every
file "regular", so it comes inline in the commit and no LFS/Xet storage is needed) and POST
/api/models/<repo>/commit/<revision> (NDJSON). Anything else is a 404; every request is recorded. Every API request
needs `Authorization: Bearer <token>` (a wrong one gets a 401), except the public GET /api/agent-harnesses that the
client's user-agent detection makes. The server stops itself after `lifetime` seconds, so a
test that forgets it cannot leave it running.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml


class HubServer:
    def __init__(self, token: str, user: str = "tester", lifetime: float = 300.0):
        self.token, self.user, self.lifetime = token, user, lifetime
        self.repos: dict[str, dict] = {}
        self.requests: list[dict] = []  # method, path, authorized, body (bytes; never the headers)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    def __enter__(self) -> HubServer:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id]["branches"][branch]

    # --------------------------------------------------------------------------------------------- routes

    def handle(self, method: str, path: str, body: bytes, authorized: bool) -> tuple[int, dict, dict]:
        with self._lock:
            self.requests.append({"method": method, "path": path, "authorized": authorized, "body": body})
        if path == "/api/agent-harnesses":  # public: huggingface_hub's user-agent detection; none is known here
            return 404, {"error": "not served by the test hub"}, {}
        if not authorized:
            return 401, {"error": "Invalid credentials in Authorization header"}, {"X-Error-Code": "Unauthorized"}
        parts = path.strip("/").split("/")
        if method == "GET" and path == "/api/whoami-v2":
            return 200, {"type": "user", "name": self.user, "orgs": [], "auth": {"type": "access_token"}}, {}
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body)["content"])
        if method == "POST" and len(parts) >= 6 and parts[:2] == ["api", "models"]:
            repo_id, action, revision = f"{parts[2]}/{parts[3]}", parts[4], unquote("/".join(parts[5:]))
            if repo_id not in self.repos:
                return 404, {"error": f"Repository {repo_id} not found"}, {"X-Error-Code": "RepoNotFound"}
            if action == "branch":
                return self._create_branch(repo_id, revision)
            if revision not in self.repos[repo_id]["branches"]:
                return 404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"}
            if action == "preupload":
                files = json.loads(body)["files"]
                return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                        "oid": None} for f in files]}, {}
            if action == "commit":
                return self._commit(repo_id, revision, body)
        return 404, {"error": f"{method} {path} is not served by the test hub"}, {"X-Error-Code": "EntryNotFound"}

    def _create_repo(self, payload: dict) -> tuple[int, dict, dict]:
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        url = {"url": f"{self.url}/{repo_id}", "name": repo_id}
        with self._lock:
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", **url}, {}
            self.repos[repo_id] = {"private": payload.get("visibility") == "private", "type": payload.get("type"),
                                   "branches": {"main": {}}, "commits": []}
        return 200, url, {}

    def _create_branch(self, repo_id: str, branch: str) -> tuple[int, dict, dict]:
        branches = self.repos[repo_id]["branches"]
        if branch in branches:
            return 409, {"error": f"Branch {branch} already exists"}, {}
        branches[branch] = dict(branches["main"])
        return 200, {}, {}

    def _validate_yaml(self, content: str) -> tuple[int, dict, dict]:
        if not content.startswith("---\n"):
            return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]}, {}
        try:
            yaml.safe_load(content.split("---\n")[1])
        except yaml.YAMLError as err:
            return 400, {"errors": [{"message": str(err)}], "warnings": []}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def _commit(self, repo_id: str, revision: str, body: bytes) -> tuple[int, dict, dict]:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        added = {}
        for item in lines:
            if item["key"] == "file":
                added[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] != "header":
                return 400, {"error": f"the test hub only takes inline files, got {item['key']}"}, {}
        oid = hashlib.sha1(body).hexdigest()
        with self._lock:
            self.repos[repo_id]["branches"][revision].update(added)
            self.repos[repo_id]["commits"].append({"revision": revision, "summary": header["summary"],
                                                   "description": header.get("description"), "files": sorted(added),
                                                   "oid": oid})
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                     "pullRequestUrl": None}, {}


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self):
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = b""
                while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
            else:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
            authorized = self.headers.get("Authorization") == f"Bearer {hub.token}"
            status, payload, headers = hub.handle(self.command, urlparse(self.path).path, body, authorized)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, *args):  # the default writes every request to stderr
            pass

    return Handler
