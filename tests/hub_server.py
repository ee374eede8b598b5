"""A local, in-memory Hugging Face Hub for the tests.

The real ``huggingface_hub``, ``timm`` and ``datasets`` clients talk to this server over HTTP
(``HF_ENDPOINT=http://127.0.0.1:PORT``); nothing in the clients is mocked. It is written from
the Hub's HTTP protocol as the clients use it, with the standard library only (plus PyYAML,
a project dependency, to check model card metadata).

Endpoints, and the client calls that use them:

========================================================  =====================================
endpoint                                                  client call
========================================================  =====================================
POST   /api/repos/create                                  HfApi.create_repo
DELETE /api/repos/delete                                  HfApi.delete_repo
GET    /api/whoami-v2                                     HfApi.whoami
GET    /api/agent-harnesses                               huggingface_hub's user agent (empty)
POST   /api/validate-yaml                                 create_commit / upload_* of a
                                                          README.md, ModelCard.validate
GET    /api/{type}s/{id}                                  model_info, dataset_info,
GET    /api/{type}s/{id}/revision/{rev}                   repo_info, repo_exists,
                                                          snapshot_download, datasets
GET    /api/{type}s/{id}/tree/{rev}[/{path}]              list_repo_tree, list_repo_files,
                                                          HfFileSystem (datasets)
POST   /api/{type}s/{id}/paths-info/{rev}                 get_paths_info, HfFileSystem.info
GET    /api/{type}s/{id}/refs                             list_repo_refs
GET    /api/{type}s/{id}/commits/{rev}                    list_repo_commits
POST   /api/{type}s/{id}/branch/{branch}                  create_branch
DELETE /api/{type}s/{id}/branch/{branch}                  delete_branch
POST   /api/{type}s/{id}/preupload/{rev}                  create_commit (upload_file/folder):
                                                          regular or LFS, and the remote oid
POST   /[{type}s/]{id}.git/info/lfs/objects/batch         create_commit: LFS basic transfer
PUT    /__lfs/upload/{oid}/{nonce}                        ... its upload URL ("presigned")
POST   /[{type}s/]{id}.git/info/lfs/objects/verify        ... its verify action
POST   /api/{type}s/{id}/commit/{rev}[?create_pr=1]       create_commit (NDJSON body)
HEAD   /[{type}s/]{id}/resolve/{rev}/{path}               hf_hub_download, file_exists,
GET    /[{type}s/]{id}/resolve/{rev}/{path}               timm hf-hub:, HfFileSystem (Range)
========================================================  =====================================

``{type}s`` is ``models``, ``datasets`` or ``spaces``; model repos have no prefix outside
``/api``. Revisions are branch names, ``refs/pr/N`` or 40-hex commit ids, URL-quoted or not.

Behaviour that follows the Hub and that callers may not expect:

- ``create_repo`` makes an "initial commit" holding a ``.gitattributes`` with the Hub's
  default LFS patterns, so a repo with two pushes has three commits.
- ``preupload`` returns the oid of the file already at that path, and the client then drops
  unchanged files from the commit; pushing identical files twice makes no second commit.
- A file goes to LFS when ``.gitattributes`` matches it, when it holds a NUL byte in its
  first 512 bytes, or when it is 10 MiB or larger.
- Committing to a branch that does not exist is a 404 ``RevisionNotFound``: create it first.
- Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``)
  and ``X-Error-Message``, which the client turns into its typed exceptions.

Authentication: any ``Authorization: Bearer <token>`` is accepted as the one user
``HubServer.user``, except tokens in ``rejected_tokens`` (401 "Invalid credentials", on every
endpoint). Writes need a token (401 without one), and are refused with 403 for repos in
``read_only_repos`` and for tokens in ``read_only_tokens``. Private repos need a token to be
read. Every request is recorded in ``HubServer.requests`` (method, path with query, headers).

Faults, for tests of what a client does when the network fails (none by default): ``fail()``
answers matching requests with an error status (a 500, or a 429 with ``Retry-After``),
``drop()`` closes the connection (a TCP reset) after reading part of the request body,
``cut()`` sends a response's headers and only part of its body, then closes, and ``slow()``
waits before answering. Each applies to requests whose method matches and whose path (without
the query) matches a regular expression (``COMMIT``, ``LFS_UPLOAD``, ``RESOLVE`` name the
usual ones), ``times`` times or, with ``times=None``, always; the first matching fault with
tries left applies. Each returns a ``Fault`` whose ``hits`` counts the requests it failed.
``clear_faults()`` removes them all (``reset()`` does too).

Repo ids are always ``namespace/name``. For tests, without HTTP: ``create_repo()`` and
``commit()`` seed repos; ``commits()``, ``files()`` and ``lfs_files()`` inspect them;
``unique_repo_id()`` names new ones; ``unhandled`` lists requests no route matched.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import logging
import re
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

logger = logging.getLogger(__name__)

REPO_TYPES = ("model", "dataset", "space")
_API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_LFS_MIN_SIZE = 10 * 1024 * 1024
_COMMIT_ID = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# The Hub writes these patterns into the .gitattributes of every new repo.
_DEFAULT_LFS_PATTERNS = (
    "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model "
    "*.msgpack *.npy *.npz *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar "
    "*.safetensors saved_model/**/* *.tar.* *.tar *.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*"
).split()
_DATASET_LFS_PATTERNS = "*.lz4 *.mds *.mp3 *.ogg *.wav *.flac *.jpg *.jpeg *.png *.webp *.gif".split()

# Paths (without the query) of the requests that faults usually target.
COMMIT = r"^/api/(models|datasets|spaces)/[^/]+/[^/]+/commit/"  # POST: create_commit
LFS_UPLOAD = r"^/__lfs/upload/"  # PUT: an LFS object's content
RESOLVE = r"/resolve/"  # GET/HEAD: a file download


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _default_gitattributes(repo_type: str) -> bytes:
    patterns = _DEFAULT_LFS_PATTERNS + (_DATASET_LFS_PATTERNS if repo_type == "dataset" else [])
    return "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in patterns).encode()


def _lfs_patterns(gitattributes: bytes) -> list[str]:
    patterns = []
    for line in gitattributes.decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) > 1 and "filter=lfs" in parts[1:]:
            patterns.append(parts[0])
    return patterns


def _matches(path: str, pattern: str) -> bool:
    """A gitattributes/gitignore pattern: without a slash it matches the base name."""
    if "/" not in pattern.strip("/"):
        return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern.strip("/"))
    return fnmatch.fnmatchcase(path, pattern.lstrip("/"))


def card_metadata(readme: bytes | str) -> dict | None:
    """The YAML front matter of a README.md, or None. Raises yaml.YAMLError if it is invalid."""
    text = readme.decode() if isinstance(readme, bytes) else readme
    match = re.match(r"^---\s*\n(.*?)\n?^---\s*$", text, re.DOTALL | re.MULTILINE)
    if match is None:
        return None
    return yaml.safe_load(match.group(1))


class Blob:
    """One file's content and the ids the Hub reports for it (an LFS file's git blob is its pointer)."""

    __slots__ = ("content", "lfs", "sha256", "blob_id", "pointer_size")

    def __init__(self, content: bytes, lfs: bool):
        self.content = content
        self.lfs = lfs
        self.sha256 = hashlib.sha256(content).hexdigest() if lfs else None
        if lfs:
            pointer = (
                f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(content)}\n"
            ).encode()
            self.blob_id, self.pointer_size = _git_blob_id(pointer), len(pointer)
        else:
            self.blob_id, self.pointer_size = _git_blob_id(content), None

    @property
    def size(self) -> int:
        return len(self.content)

    @property
    def oid(self) -> str:
        """What the client compares with its local file: sha256 for LFS, git blob id otherwise."""
        return self.sha256 or self.blob_id

    def tree_entry(self, path: str) -> dict:
        entry = {"type": "file", "oid": self.blob_id, "size": self.size, "path": path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return entry


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, Blob]
    author: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str = field(default_factory=_now)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    pull_requests: list[str] = field(default_factory=list)  # head commit of refs/pr/{i + 1}

    def head(self, revision: str) -> Commit | None:
        """The commit a branch, refs/heads/X, refs/pr/N or commit id points to."""
        revision = revision.removeprefix("refs/heads/")
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        pr = re.fullmatch(r"refs/pr/(\d+)", revision)
        if pr and 0 < int(pr.group(1)) <= len(self.pull_requests):
            return self.commits[self.pull_requests[int(pr.group(1)) - 1]]
        return self.commits.get(revision)

    def history(self, commit: Commit) -> list[Commit]:
        """First-parent history, newest first."""
        chain = [commit]
        while chain[-1].parent is not None:
            chain.append(self.commits[chain[-1].parent])
        return chain


@dataclass
class RecordedRequest:
    method: str
    path: str  # as sent, with the query string
    headers: dict[str, str]  # names in lower case


@dataclass
class Fault:
    """A failure injected into the requests that match ``method`` and ``path`` (a regex on the path)."""

    kind: str  # "fail", "drop", "cut" or "slow"
    method: str
    path: str
    times: int | None  # None: every matching request
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    after: float | None = None  # drop: request body bytes read first; cut: response body bytes sent
    seconds: float = 0.0  # slow: the delay before answering
    hits: int = 0  # requests it has failed so far

    def matches(self, method: str, path: str) -> bool:
        left = self.times is None or self.hits < self.times
        return left and method == self.method and re.search(self.path, path) is not None


def _split_body_bytes(after: float | None, length: int) -> int:
    """How many of ``length`` bytes a drop or cut lets through: a count, a fraction (< 1), or half."""
    if after is None:
        return length // 2
    if 0 < after < 1:
        return int(length * after)
    return min(int(after), length)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def _repo_not_found(status: int = 404) -> HubError:
    return HubError(status, "Repository not found", "RepoNotFound")


def _revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


@dataclass
class _Request:
    method: str
    segments: list[str]  # raw (still URL-quoted) path segments
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    token: str | None

    def json(self):
        return json.loads(self.body or b"{}")

    def flag(self, name: str) -> bool:
        return self.query.get(name, [""])[-1].lower() in ("1", "true")


def _json(data, status: int = 200, headers: dict | None = None) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(data).encode()


def _take_revision(parts: list[str]) -> tuple[str, list[str]]:
    """Split URL segments into a revision and the rest; refs/pr/N may come quoted or not."""
    if not parts:
        raise HubError(400, "Missing revision")
    if parts[0] == "refs" and len(parts) >= 3:
        return "/".join(parts[:3]), parts[3:]
    return unquote(parts[0]), parts[1:]


class HubServer:
    """An in-memory Hub on 127.0.0.1 with a random port. Use `start()`/`stop()` or `with`."""

    def __init__(self, user: str = "test-user", token: str | None = None):
        self.user = user
        self.token = token  # the token the test clients are configured with (any token works)
        self.home: str | None = None  # the clients' HF_HOME, where a harness sets one
        self.requests: list[RecordedRequest] = []
        self.unhandled: list[str] = []  # "METHOD path" of requests no route matched
        self.rejected_tokens: set[str] = set()
        self.read_only_tokens: set[str] = set()
        self.read_only_repos: set[tuple[str, str]] = set()  # (repo_type, repo_id)
        self._repos: dict[tuple[str, str], Repo] = {}
        self._lfs: dict[tuple[str, str, str], bytes] = {}  # (repo_type, repo_id, oid) -> content
        self._pending_uploads: dict[str, tuple[str, str, str, int]] = {}  # nonce -> (type, id, oid, size)
        self.faults: list[Fault] = []
        self._lock = threading.RLock()
        self._names = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "HubServer":
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "the server is not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- helpers for tests -------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every repo, LFS object, recorded request and auth setting."""
        with self._lock:
            self._repos.clear()
            self._lfs.clear()
            self._pending_uploads.clear()
            self.clear_log()
            self.rejected_tokens.clear()
            self.read_only_tokens.clear()
            self.read_only_repos.clear()
            self.faults.clear()

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()
            self.unhandled.clear()

    # -- faults ------------------------------------------------------------------------------

    def fail(self, method: str, path: str, status: int = 500, times: int | None = 1,
             retry_after: int | str | None = None) -> Fault:
        """Answer matching requests with ``status`` (after reading their body); 429s may carry Retry-After."""
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        return self._add_fault(Fault("fail", method, path, times, status=status, headers=headers))

    def drop(self, method: str, path: str, after: float | None = None, times: int | None = 1) -> Fault:
        """Reset the connection of matching requests after reading ``after`` bytes (or that fraction,
        or half) of their body: the client sees its upload cut, with no response."""
        return self._add_fault(Fault("drop", method, path, times, after=after))

    def cut(self, method: str, path: str, after: float | None = None, times: int | None = 1) -> Fault:
        """Answer matching requests with their full headers but only ``after`` bytes (or that fraction,
        or half) of the body, then close the connection: a download cut partway."""
        return self._add_fault(Fault("cut", method, path, times, after=after))

    def slow(self, method: str, path: str, seconds: float, times: int | None = None) -> Fault:
        """Wait ``seconds`` before answering matching requests."""
        return self._add_fault(Fault("slow", method, path, times, seconds=seconds))

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def _add_fault(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def _take_fault(self, method: str, path: str) -> Fault | None:
        """The first fault that applies to this request, counted as hit."""
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    return fault
        return None

    def unique_repo_id(self, name: str = "repo", namespace: str = "org") -> str:
        """A repo id no earlier call returned, e.g. "org/model-3"."""
        with self._lock:
            self._names += 1
            return f"{namespace}/{name}-{self._names}"

    def create_repo(self, repo_type: str, repo_id: str, private: bool = False) -> Repo:
        """Create a repo directly (no HTTP), with the Hub's initial commit."""
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise ValueError(f"{repo_type} repo {repo_id} exists")
            repo = Repo(repo_type, repo_id, private)
            files = {".gitattributes": Blob(_default_gitattributes(repo_type), lfs=False)}
            self._add_commit(repo, None, files, "initial commit", "", "main")
            self._repos[(repo_type, repo_id)] = repo
            return repo

    def commit(
        self,
        repo_type: str,
        repo_id: str,
        files: dict[str, bytes | str | None],
        revision: str = "main",
        message: str = "Seed files",
    ) -> str:
        """Commit files directly (no HTTP); None deletes a path. Returns the commit id."""
        with self._lock:
            repo = self.repo(repo_type, repo_id)
            head = repo.head(revision)
            if head is None:
                raise KeyError(f"{repo_id} has no revision {revision}")
            tree = dict(head.files)
            for path, content in files.items():
                if content is None:
                    tree.pop(path, None)
                else:
                    data = content.encode() if isinstance(content, str) else content
                    tree[path] = Blob(data, self._wants_lfs(head, path, data[:512], len(data)))
            return self._add_commit(repo, head.oid, tree, message, "", revision).oid

    def repo(self, repo_type: str, repo_id: str) -> Repo:
        with self._lock:
            return self._repos[(repo_type, repo_id)]

    def repo_exists(self, repo_type: str, repo_id: str) -> bool:
        return (repo_type, repo_id) in self._repos

    def commits(self, repo_type: str, repo_id: str, revision: str = "main") -> list[Commit]:
        """The history of a revision, newest first; the last one is the "initial commit"."""
        with self._lock:
            repo = self.repo(repo_type, repo_id)
            head = repo.head(revision)
            if head is None:
                raise KeyError(f"{repo_id} has no revision {revision}")
            return repo.history(head)

    def files(self, repo_type: str, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Path -> content of every file at a revision."""
        head = self.commits(repo_type, repo_id, revision)[0]
        return {path: blob.content for path, blob in head.files.items()}

    def lfs_files(self, repo_type: str, repo_id: str, revision: str = "main") -> set[str]:
        """The paths stored in LFS at a revision."""
        head = self.commits(repo_type, repo_id, revision)[0]
        return {path for path, blob in head.files.items() if blob.lfs}

    # -- state changes (hold the lock) -------------------------------------------------------

    def _add_commit(
        self, repo: Repo, parent: str | None, files: dict, title: str, message: str, ref: str | None
    ) -> Commit:
        commit = Commit(secrets.token_hex(20), parent, title, message, _now(), files, self.user)
        repo.commits[commit.oid] = commit
        for blob in files.values():
            if blob.lfs:
                self._lfs[(repo.repo_type, repo.repo_id, blob.sha256)] = blob.content
        if ref is not None and (pr := re.fullmatch(r"refs/pr/(\d+)", ref)):
            repo.pull_requests[int(pr.group(1)) - 1] = commit.oid
        elif ref is not None:
            repo.branches[ref.removeprefix("refs/heads/")] = commit.oid
        return commit

    def _wants_lfs(self, head: Commit, path: str, sample: bytes, size: int) -> bool:
        gitattributes = head.files.get(".gitattributes")
        patterns = _lfs_patterns(gitattributes.content) if gitattributes else []
        return size >= _LFS_MIN_SIZE or b"\0" in sample or any(_matches(path, p) for p in patterns)

    # -- request handling --------------------------------------------------------------------

    def handle(self, request: _Request) -> tuple[int, dict, bytes]:
        if request.token is not None and request.token in self.rejected_tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        s = request.segments
        if s[:1] == ["api"]:
            return self._route_api(request, s[1:])
        if s[:2] == ["__lfs", "upload"] and len(s) == 4 and request.method == "PUT":
            return self._lfs_upload(request, s[2], s[3])
        repo_type, rest = (_API_TYPES[s[0]], s[1:]) if s and s[0] in ("datasets", "spaces") else ("model", s)
        if len(rest) >= 2 and rest[1].endswith(".git"):
            repo_id = f"{unquote(rest[0])}/{unquote(rest[1][:-4])}"
            if rest[2:] == ["info", "lfs", "objects", "batch"] and request.method == "POST":
                return self._lfs_batch(request, repo_type, repo_id)
            if rest[2:] == ["info", "lfs", "objects", "verify"] and request.method == "POST":
                return self._lfs_verify(request, repo_type, repo_id)
        if len(rest) >= 4 and rest[2] == "resolve" and request.method in ("GET", "HEAD"):
            repo_id = f"{unquote(rest[0])}/{unquote(rest[1])}"
            revision, path = _take_revision(rest[3:])
            return self._resolve(request, repo_type, repo_id, revision, unquote("/".join(path)))
        raise self._unhandled(request)

    def _unhandled(self, request: _Request) -> HubError:
        route = f"{request.method} /{'/'.join(request.segments)}"
        self.unhandled.append(route)
        logger.warning("hub_server: no route for %s", route)
        return HubError(404, f"No route for {route}")

    def _route_api(self, request: _Request, s: list[str]) -> tuple[int, dict, bytes]:
        method = request.method
        if s == ["repos", "create"] and method == "POST":
            return self._create_repo(request)
        if s == ["repos", "delete"] and method in ("DELETE", "POST"):
            return self._delete_repo(request)
        if s == ["validate-yaml"] and method == "POST":
            return self._validate_yaml(request)
        if s == ["agent-harnesses"] and method == "GET":
            return _json({"standardEnvVars": [], "harnesses": {}})
        if s == ["whoami-v2"] and method == "GET":
            self._require_token(request)
            return _json({"type": "user", "name": self.user, "fullname": self.user, "orgs": [],
                          "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
        if len(s) >= 3 and s[0] in _API_TYPES:
            repo_type, repo_id, rest = _API_TYPES[s[0]], f"{unquote(s[1])}/{unquote(s[2])}", s[3:]
            action, args = (rest[0], rest[1:]) if rest else ("", [])
            if action == "" and method == "GET":
                return self._repo_info(request, repo_type, repo_id, "main")
            if action == "revision" and method == "GET":
                return self._repo_info(request, repo_type, repo_id, unquote("/".join(args)))
            if action == "tree" and method == "GET":
                revision, path = _take_revision(args)
                return self._tree(request, repo_type, repo_id, revision, unquote("/".join(path)))
            if action == "paths-info" and method == "POST":
                return self._paths_info(request, repo_type, repo_id, _take_revision(args)[0])
            if action == "refs" and method == "GET":
                return self._refs(request, repo_type, repo_id)
            if action == "commits" and method == "GET":
                return self._list_commits(request, repo_type, repo_id, _take_revision(args)[0])
            if action == "branch" and method in ("POST", "DELETE"):
                return self._branch(request, repo_type, repo_id, unquote("/".join(args)))
            if action == "preupload" and method == "POST":
                return self._preupload(request, repo_type, repo_id, _take_revision(args)[0])
            if action == "commit" and method == "POST":
                return self._commit(request, repo_type, repo_id, _take_revision(args)[0])
        raise self._unhandled(request)

    # -- auth ----------------------------------------------------------------------------------

    def _require_token(self, request: _Request) -> None:
        if request.token is None:
            raise HubError(401, "Invalid username or password.")

    def _readable_repo(self, request: _Request, repo_type: str, repo_id: str) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _repo_not_found()
        if repo.private and request.token is None:
            raise _repo_not_found(401)
        return repo

    def _writable_repo(self, request: _Request, repo_type: str, repo_id: str) -> Repo:
        self._require_token(request)
        repo = self._readable_repo(request, repo_type, repo_id)
        if (repo_type, repo_id) in self.read_only_repos or request.token in self.read_only_tokens:
            raise HubError(403, f"You don't have the rights to write to {repo_type} {repo_id}")
        return repo

    def _revision(self, repo: Repo, revision: str) -> Commit:
        commit = repo.head(revision)
        if commit is None:
            raise _revision_not_found(revision)
        return commit

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # -- repos ---------------------------------------------------------------------------------

    def _create_repo(self, request: _Request) -> tuple[int, dict, bytes]:
        self._require_token(request)
        if request.token in self.read_only_tokens:
            raise HubError(403, "You don't have the rights to create a repo")
        payload = request.json()
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                repo = self._repos[(repo_type, repo_id)]
                return _json({"error": "You already created this repo", "url": self._repo_url(repo)}, 409)
            repo = self.create_repo(repo_type, repo_id, private)
        return _json({"url": self._repo_url(repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self, request: _Request) -> tuple[int, dict, bytes]:
        payload = request.json()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        with self._lock:
            self._writable_repo(request, repo_type, repo_id)
            del self._repos[(repo_type, repo_id)]
            for key in [k for k in self._lfs if k[:2] == (repo_type, repo_id)]:
                del self._lfs[key]
        return 200, {}, b""

    def _validate_yaml(self, request: _Request) -> tuple[int, dict, bytes]:
        content = request.json().get("content", "")
        try:
            metadata = card_metadata(content)
        except yaml.YAMLError as e:
            return _json({"errors": [{"message": f"Invalid YAML in README.md: {e}"}]}, 400)
        if metadata is not None and not isinstance(metadata, dict):
            return _json({"errors": [{"message": "YAML metadata in README.md must be a mapping"}]}, 400)
        warnings = [] if metadata else [{"message": "empty or missing yaml metadata in repo card"}]
        return _json({"errors": [], "warnings": warnings})

    def _repo_info(self, request: _Request, repo_type: str, repo_id: str, revision: str):
        with self._lock:
            repo = self._readable_repo(request, repo_type, repo_id)
            commit = self._revision(repo, revision)
            readme = commit.files.get("README.md")
        try:
            card = card_metadata(readme.content) if readme else None
        except yaml.YAMLError:
            card = None
        card = card if isinstance(card, dict) else None
        with_blobs = request.flag("blobs")
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if with_blobs:
                sibling.update(size=blob.size, blobId=blob.blob_id)
                if blob.lfs:
                    sibling["lfs"] = {"sha256": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
            siblings.append(sibling)
        tags = [str(t) for t in (card or {}).get("tags") or []]
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "siblings": siblings,
            "usedStorage": sum(blob.size for blob in commit.files.values()),
        }
        if card is not None:
            info["cardData"] = card
        if repo_type == "model" and card is not None:
            info.update(library_name=card.get("library_name"), pipeline_tag=card.get("pipeline_tag"))
        return _json(info)

    # -- trees -----------------------------------------------------------------------------------

    def _last_commits(self, repo: Repo, commit: Commit) -> dict[str, Commit]:
        """For every path at `commit`, the newest commit that changed it."""
        last: dict[str, Commit] = {}
        previous: dict[str, Blob] = {}
        for c in reversed(repo.history(commit)):
            for path, blob in c.files.items():
                if path not in previous or previous[path].blob_id != blob.blob_id:
                    last[path] = c
            previous = c.files
        return last

    def _entries(self, repo: Repo, commit: Commit, paths: list[str], expand: bool) -> list[dict]:
        """Tree entries (file or directory) for existing paths, in the order given."""
        last = self._last_commits(repo, commit) if expand else {}
        entries = []
        for path in paths:
            if path in commit.files:
                entry = commit.files[path].tree_entry(path)
                newest = last.get(path)
            else:
                inside = sorted(p for p in commit.files if p.startswith(path + "/"))
                if not inside:
                    continue
                entry = {
                    "type": "directory",
                    "oid": hashlib.sha1("\n".join(commit.files[p].blob_id + p for p in inside).encode()).hexdigest(),
                    "size": 0,
                    "path": path,
                }
                newest = max((last[p] for p in inside), key=lambda c: c.date) if expand else None
            if newest is not None:
                entry["lastCommit"] = {"id": newest.oid, "title": newest.title, "date": newest.date}
            entries.append(entry)
        return entries

    def _tree(self, request: _Request, repo_type: str, repo_id: str, revision: str, path: str):
        with self._lock:
            repo = self._readable_repo(request, repo_type, repo_id)
            commit = self._revision(repo, revision)
            path = path.strip("/")
            prefix = path + "/" if path else ""
            below = [p for p in commit.files if p.startswith(prefix)]
            if path and not below:
                raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound",
                               {"X-Repo-Commit": commit.oid})
            if request.flag("recursive"):
                names = set(below)
                for p in below:
                    parts = p[len(prefix):].split("/")[:-1]
                    names.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            else:
                names = {prefix + p[len(prefix):].split("/")[0] for p in below}
            entries = self._entries(repo, commit, sorted(names), request.flag("expand"))
        return _json(entries)

    def _paths_info(self, request: _Request, repo_type: str, repo_id: str, revision: str):
        if request.headers.get("content-type", "").startswith("application/json"):
            payload = request.json()
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(request.body.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), form.get("expand", [""])[-1].lower() in ("1", "true")
        paths = [paths] if isinstance(paths, str) else paths
        with self._lock:
            repo = self._readable_repo(request, repo_type, repo_id)
            commit = self._revision(repo, revision)
            entries = self._entries(repo, commit, [p.strip("/") for p in paths], expand)
        return _json(entries)

    def _refs(self, request: _Request, repo_type: str, repo_id: str):
        with self._lock:
            repo = self._readable_repo(request, repo_type, repo_id)
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in repo.branches.items()]
            pulls = [
                {"name": f"refs/pr/{i + 1}", "ref": f"refs/pr/{i + 1}", "targetCommit": oid}
                for i, oid in enumerate(repo.pull_requests)
            ]
        data = {"branches": branches, "converts": [], "tags": []}
        if request.flag("include_prs"):
            data["pullRequests"] = pulls
        return _json(data)

    def _list_commits(self, request: _Request, repo_type: str, repo_id: str, revision: str):
        with self._lock:
            repo = self._readable_repo(request, repo_type, repo_id)
            history = repo.history(self._revision(repo, revision))
        return _json([
            {"id": c.oid, "title": c.title, "message": c.message, "date": c.date,
             "authors": [{"user": c.author}], "parents": [c.parent] if c.parent else []}
            for c in history
        ])

    def _branch(self, request: _Request, repo_type: str, repo_id: str, branch: str):
        with self._lock:
            repo = self._writable_repo(request, repo_type, repo_id)
            if request.method == "DELETE":
                if branch not in repo.branches:
                    raise _revision_not_found(branch)
                if branch == "main":
                    raise HubError(403, "Cannot delete the default branch")
                del repo.branches[branch]
                return _json({})
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            start = self._revision(repo, request.json().get("startingPoint") or "main")
            repo.branches[branch] = start.oid
        return _json({})

    # -- uploads ---------------------------------------------------------------------------------

    def _preupload(self, request: _Request, repo_type: str, repo_id: str, revision: str):
        payload = request.json()
        ignore = [line.strip() for line in (payload.get("gitIgnore") or "").splitlines()]
        ignore = [p for p in ignore if p and not p.startswith("#")]
        with self._lock:
            repo = self._writable_repo(request, repo_type, repo_id)
            head = self._revision(repo, revision)
            files = []
            for item in payload.get("files", []):
                path, size = item["path"], int(item["size"])
                sample = base64.b64decode(item.get("sample", ""))
                existing = head.files.get(path)
                files.append({
                    "path": path,
                    "uploadMode": "lfs" if self._wants_lfs(head, path, sample, size) else "regular",
                    "shouldIgnore": any(_matches(path, p) for p in ignore),
                    "oid": existing.oid if existing else None,
                })
        return _json({"files": files, "commitOid": head.oid})

    def _lfs_batch(self, request: _Request, repo_type: str, repo_id: str):
        payload = request.json()
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported")
        objects = []
        with self._lock:
            repo = self._writable_repo(request, repo_type, repo_id)
            verify_url = f"{self._repo_url(repo)}.git/info/lfs/objects/verify"
            for obj in payload.get("objects", []):
                oid, size = obj.get("oid"), obj.get("size")
                if not (isinstance(oid, str) and _SHA256.match(oid) and isinstance(size, int)):
                    objects.append({"oid": str(oid), "size": int(size or 0),
                                    "error": {"code": 422, "message": "Invalid oid or size"}})
                elif (repo_type, repo_id, oid) in self._lfs:
                    objects.append({"oid": oid, "size": size})  # already stored: nothing to do
                else:
                    nonce = secrets.token_hex(16)
                    self._pending_uploads[nonce] = (repo_type, repo_id, oid, size)
                    objects.append({
                        "oid": oid,
                        "size": size,
                        "authenticated": True,
                        "actions": {
                            "upload": {"href": f"{self.url}/__lfs/upload/{oid}/{nonce}", "header": {}},
                            "verify": {"href": verify_url, "header": {}},
                        },
                    })
        body = {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}
        return 200, {"Content-Type": "application/vnd.git-lfs+json"}, json.dumps(body).encode()

    def _lfs_upload(self, request: _Request, oid: str, nonce: str):
        """The "presigned" URL of an LFS object: no Authorization, the nonce is the signature."""
        with self._lock:
            expected = self._pending_uploads.get(nonce)
            if expected is None or expected[2] != oid:
                raise HubError(403, "Invalid or expired upload URL")
            repo_type, repo_id, _, size = expected
            if hashlib.sha256(request.body).hexdigest() != oid or len(request.body) != size:
                raise HubError(400, "Uploaded content does not match its oid and size")
            del self._pending_uploads[nonce]
            self._lfs[(repo_type, repo_id, oid)] = request.body
        return 200, {"ETag": f'"{hashlib.md5(request.body).hexdigest()}"'}, b""

    def _lfs_verify(self, request: _Request, repo_type: str, repo_id: str):
        payload = request.json()
        with self._lock:
            self._writable_repo(request, repo_type, repo_id)
            data = self._lfs.get((repo_type, repo_id, payload.get("oid", "")))
        if data is None or len(data) != payload.get("size"):
            raise HubError(404, "LFS object not found", "EntryNotFound")
        return _json({"success": True})

    def _commit(self, request: _Request, repo_type: str, repo_id: str, revision: str):
        lines = [json.loads(line) for line in request.body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header = lines[0]["value"]
        create_pr = request.flag("create_pr")
        with self._lock:
            repo = self._writable_repo(request, repo_type, repo_id)
            head = self._revision(repo, revision)
            if _COMMIT_ID.match(revision) and not create_pr:
                raise HubError(400, f"Invalid rev id: {revision} is not a branch")
            parent = header.get("parentCommit")
            if parent is not None and create_pr:
                head = self._revision(repo, parent)
            elif parent is not None and parent != head.oid:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for line in lines[1:]:
                self._apply(repo, files, line.get("key"), line.get("value", {}))
            ref = revision
            if create_pr:
                repo.pull_requests.append(head.oid)
                ref = f"refs/pr/{len(repo.pull_requests)}"
            commit = self._add_commit(repo, head.oid, files, header.get("summary", ""),
                                      header.get("description", ""), ref)
        repo_url = self._repo_url(repo)
        return _json({
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{repo_url}/commit/{commit.oid}",
            "hookOutput": "",
            "pullRequestUrl": f"{repo_url}/discussions/{len(repo.pull_requests)}" if create_pr else None,
        })

    def _apply(self, repo: Repo, files: dict[str, Blob], key: str | None, value: dict) -> None:
        path = value.get("path", "")
        if key == "file":
            raw = value.get("content", "")
            data = base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
            files[path] = Blob(data, lfs=False)
        elif key == "lfsFile":
            data = self._lfs.get((repo.repo_type, repo.repo_id, value.get("oid", "")))
            if data is None:
                raise HubError(422, f"LFS object {value.get('oid')} for {path} was not uploaded")
            if value.get("size") is not None and value["size"] != len(data):
                raise HubError(400, f"Size mismatch for {path}")
            files[path] = Blob(data, lfs=True)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            prefix = path.rstrip("/") + "/"
            doomed = [p for p in files if p.startswith(prefix)]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in doomed:
                del files[p]
        else:
            raise HubError(400, f"Unknown commit operation: {key}")

    # -- downloads -------------------------------------------------------------------------------

    def _resolve(self, request: _Request, repo_type: str, repo_id: str, revision: str, path: str):
        with self._lock:
            repo = self._readable_repo(request, repo_type, repo_id)
            commit = self._revision(repo, revision)
            blob = commit.files.get(path)
        headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound", headers)
        headers.update(ETag=f'"{blob.oid}"', **{"Content-Type": "application/octet-stream"})
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        data, status = blob.content, 200
        byte_range = request.headers.get("range")
        if byte_range:
            start, end = _parse_range(byte_range, len(data))
            if start > end:
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        return status, headers, data


def _parse_range(value: str, size: int) -> tuple[int, int]:
    """Inclusive byte bounds of a single `bytes=` range; start > end when unsatisfiable."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", value)
    if match is None or match.groups() == ("", ""):
        return 0, size - 1
    first, last = match.groups()
    if first == "":
        return max(size - int(last), 0), size - 1
    return int(first), min(int(last), size - 1) if last else size - 1


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        logger.debug("hub_server: " + format, *args)

    def _abort(self) -> None:
        """Close the connection with a TCP reset, whatever the client is still sending or awaiting."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _drop(self, fault: Fault) -> None:
        length = self.headers.get("Content-Length")
        if length is not None:
            self.rfile.read(_split_body_bytes(fault.after, int(length)))
        else:  # chunked: the raw bytes that arrive first
            self.rfile.read1(max(int(fault.after or 1), 1))
        self._abort()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self) -> None:
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        headers = {k.lower(): v for k, v in self.headers.items()}
        with hub._lock:
            hub.requests.append(RecordedRequest(self.command, self.path, dict(headers)))
        split = urlsplit(self.path)
        fault = hub._take_fault(self.command, split.path)
        if fault is not None and fault.kind == "drop":
            return self._drop(fault)
        body = self._read_body()
        if fault is not None and fault.kind == "slow":
            time.sleep(fault.seconds)
        auth = headers.get("authorization", "")
        token = auth[len("bearer "):].strip() if auth.lower().startswith("bearer ") else None
        request = _Request(
            method=self.command,
            segments=[s for s in split.path.split("/") if s],
            query=parse_qs(split.query, keep_blank_values=True),
            headers=headers,
            body=body,
            token=token or None,
        )
        try:
            if fault is not None and fault.kind == "fail":
                raise HubError(fault.status, f"Injected fault: {fault.status}", headers=dict(fault.headers))
            status, out_headers, data = hub.handle(request)
        except HubError as e:
            status, out_headers, data = _json({"error": e.message}, e.status, e.headers)
            if e.code:
                out_headers["X-Error-Code"] = e.code
            out_headers["X-Error-Message"] = e.message
        except Exception as e:  # a bug in the server: make it loud in the client's error
            logger.exception("hub_server: error while handling %s %s", self.command, self.path)
            status, out_headers, data = _json({"error": f"hub_server bug: {e!r}"}, 500)
        self.send_response(status)
        for name, value in out_headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault is not None and fault.kind == "cut":
            if self.command != "HEAD":
                self.wfile.write(data[: _split_body_bytes(fault.after, len(data))])
            self.wfile.flush()
            self.close_connection = True  # the client sees the body end early
            return
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch
