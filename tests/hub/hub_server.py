"""A local stand-in for the Hub's write API, enough for `HfApi.create_repo`, `create_branch` and `upload_folder`.

It records what arrives instead of storing a git repository: `server.repos["user/name"]` holds the visibility, the
branches and every commit as {path: bytes}. Uploads are steered to the "regular" mode (base64 inside the NDJSON
commit), so no LFS or Xet storage is needed.

    with HubTestServer() as server:
        api = HfApi(endpoint=server.url, token="hf_test")
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    private: bool
    branches: set[str] = field(default_factory=lambda: {"main"})
    commits: list[dict] = field(default_factory=list)  # {"revision", "summary", "files": {path: bytes}}


class HubTestServer:
    """A threaded HTTP server speaking the subset of the Hub API that uploads use."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubTestServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                path = unquote(urlparse(self.path).path)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.requests.append(("POST", path))
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = f"{payload['organization']}/{payload['name']}"
                    if repo_id in server.repos:
                        return self._reply(409, {"error": "You already created this model repo", "url": repo_id})
                    server.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
                    return self._reply(200, {"url": f"{server.url}/{repo_id}"})
                if path == "/api/validate-yaml":
                    return self._reply(200, {})
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/(.+)", path)
                if match is None or match.group(1) not in server.repos:
                    return self._reply(404, {"error": f"not found: {path}"})
                repo, action, revision = server.repos[match.group(1)], match.group(2), match.group(3)
                if action == "branch":
                    if revision in repo.branches:
                        return self._reply(409, {"error": "branch exists"})
                    repo.branches.add(revision)
                    return self._reply(200, {})
                if revision not in repo.branches:
                    return self._reply(404, {"error": f"revision {revision} not found"})
                if action == "preupload":
                    files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                             for f in json.loads(body)["files"]]
                    return self._reply(200, {"files": files})
                return self._commit(match.group(1), repo, revision, body)

            def _commit(self, repo_id: str, repo: Repo, revision: str, body: bytes):
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                files, summary = {}, None
                for line in lines:
                    if line["key"] == "header":
                        summary = line["value"]["summary"]
                    elif line["key"] == "file" and line["value"].get("encoding") == "base64":
                        files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                    else:
                        return self._reply(400, {"error": f"unsupported commit operation {line['key']}"})
                repo.commits.append({"revision": revision, "summary": summary, "files": files})
                oid = hashlib.sha1(body).hexdigest()
                return self._reply(200, {"commitUrl": f"{server.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                         "success": True})

        return Handler
