"""A reverse proxy in front of fake-gcs-server that behaves more like real GCS, for the tests.

fake-gcs-server (v1.54) ignores ``ifGenerationMatch`` and friends on compose, delete, metadata
updates and resumable uploads; real GCS enforces them, and our append path relies on compose's
``if_generation_match`` as a fence. :class:`GcsProxy` forwards every request to the emulator and:

* **enforces preconditions** (JSON API) on every object-mutating request: before forwarding it
  reads the target's current generation/metageneration from the emulator (a missing object has
  generation 0) and answers 412 ``conditionNotMet`` like GCS when they do not match. The check and
  the forward happen under a lock per object name, so of two writers racing with the same
  expected generation exactly one wins. Covered: compose (destination, and each source's
  ``objectPreconditions.ifGenerationMatch``), delete, patch/update, rewrite/copy (destination and
  ``ifSourceGenerationMatch``), uploads (multipart/media) and resumable uploads (at initiation and
  again on the finalizing chunk);
* **injects faults** the test thread programs: :meth:`GcsProxy.fail_next` answers an error instead
  of (or, with ``after=True``, after) forwarding, :meth:`GcsProxy.stall_next` delays a request,
  :meth:`GcsProxy.hold` parks a request until the test releases it;
* **enforces the limits of real GCS** that the emulator ignores: at most 32 compose sources and
  8 KiB of custom metadata (400 ``invalid``), and, with ``mutation_interval`` (about 1 s on GCS),
  one mutation per object name per interval (429 ``rateLimitExceeded``);
* **presents bucket and object policies** the test sets with :meth:`GcsProxy.present_bucket` and
  :meth:`GcsProxy.place_hold` (soft delete, versioning, storage class, retention policy, holds):
  bucket and object reads carry them, and a retention policy or a hold makes replacing or deleting
  an object fail with 403 like GCS;
* **counts** every exchange (:attr:`GcsProxy.stats`, :meth:`GcsProxy.count`).

URLs the emulator returns (resumable ``Location``, ``mediaLink``, ``selfLink``) are rewritten to
point at the proxy, so no request bypasses it. Bodies are read whole (fine up to ~100 MB).

Usage::

    proxy = GcsProxy(services.gcs_url)
    with proxy as url:  # or proxy.start() ... proxy.close()
        bucket = GCSResource(bucket="logs", emulator_host=url).get_bucket()
        proxy.fail_next(2, 503, kind="upload")
        ...
        assert proxy.count(kind="compose", status=412) >= 1
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
import urllib.parse
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Literal

__all__ = ["BucketPolicy", "Exchange", "GcsProxy", "Hold", "Kind"]

Kind = Literal[
    "compose",
    "copy",
    "delete",
    "download",
    "get",
    "list",
    "patch",
    "resumable-init",
    "resumable-put",
    "rewrite",
    "update",
    "upload",
    "bucket",
    "other",
]

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_PRECONDITIONS = (
    "ifGenerationMatch",
    "ifGenerationNotMatch",
    "ifMetagenerationMatch",
    "ifMetagenerationNotMatch",
)
_ERROR_REASONS = {
    400: "invalid",
    403: "forbidden",
    404: "notFound",
    408: "requestTimeout",
    412: "conditionNotMet",
    429: "rateLimitExceeded",
    500: "internalError",
    502: "badGateway",
    503: "backendError",
    504: "gatewayTimeout",
}
_HOLD_LIMIT_SECONDS = 120.0  # a forgotten hold never parks a request forever
# Documented limits of Cloud Storage that fake-gcs-server does not enforce.
MAX_COMPOSE_SOURCES = 32
MAX_CUSTOM_METADATA_BYTES = 8 * 1024


# -- what a request is ---------------------------------------------------------------------------

ObjectKey = tuple[str, str]  # (bucket, object name)


@dataclass(frozen=True)
class _Check:
    """One precondition on one object: ``field`` (generation|metageneration) ``op`` ``value``."""

    key: ObjectKey
    field: Literal["generation", "metageneration"]
    equal: bool
    value: int


@dataclass
class _Request:
    method: str
    path: str  # raw path, percent-encoded, without the query
    target: str  # path + query, as received
    query: dict[str, str]
    headers: list[tuple[str, str]]
    body: bytes
    kind: Kind = "other"
    key: ObjectKey | None = None  # the object this request reads or writes
    mutates: bool = False
    checks: list[_Check] = field(default_factory=list)
    upload_id: str | None = None
    metadata: dict[str, object] | None = None  # custom metadata the request sets, if any
    sources: int = 0  # compose: how many source objects


def _segments(path: str) -> list[str]:
    return [urllib.parse.unquote(part) for part in path.strip("/").split("/")]


def _multipart_metadata(headers: list[tuple[str, str]], body: bytes) -> dict[str, object]:
    """The JSON metadata part of a ``multipart/related`` upload body (empty if unparsable)."""
    content_type = next((v for k, v in headers if k.lower() == "content-type"), "")
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        return {}
    parts = body.split(b"--" + match.group(1).encode())
    if len(parts) < 2:
        return {}
    _, _, payload = parts[1].partition(b"\r\n\r\n")
    try:
        decoded = json.loads(payload.strip())
    except ValueError:
        return {}
    return decoded if isinstance(decoded, dict) else {}


def _json_body(body: bytes) -> dict[str, object]:
    try:
        decoded = json.loads(body) if body else {}
    except ValueError:
        return {}
    return decoded if isinstance(decoded, dict) else {}


def _custom_metadata(resource: dict[str, object]) -> dict[str, object] | None:
    metadata = resource.get("metadata")
    return metadata if isinstance(metadata, dict) else None


def _metadata_bytes(metadata: dict[str, object]) -> int:
    """Size of custom metadata as GCS counts it: keys and values, UTF-8."""
    return sum(len(str(k).encode()) + len(str(v or "").encode()) for k, v in metadata.items())


def _query_checks(query: dict[str, str], key: ObjectKey, prefix: str = "") -> list[_Check]:
    checks = []
    for name in _PRECONDITIONS:
        param = prefix + (name[0].upper() + name[1:] if prefix else name)
        if param in query:
            meta = "Metageneration" in name
            checks.append(
                _Check(
                    key,
                    "metageneration" if meta else "generation",
                    equal=not name.endswith("NotMatch"),
                    value=int(query[param]),
                )
            )
    return checks


def _classify(req: _Request) -> None:
    """Fill in kind, target object, whether it mutates, and the preconditions to enforce."""
    parts = _segments(req.path)
    q = req.query
    if parts[:4] == ["upload", "storage", "v1", "b"] and len(parts) >= 6 and parts[5] == "o":
        bucket = parts[4]
        if "upload_id" in q:
            req.kind, req.mutates, req.upload_id = "resumable-put", True, q["upload_id"]
            return  # key and checks come from the initiation (see GcsProxy._handle)
        upload_type = q.get("uploadType", "")
        if upload_type == "resumable":
            req.kind = "resumable-init"
            name = _json_body(req.body).get("name") or q.get("name")
        else:
            req.kind = "upload"
            name = q.get("name")
            if upload_type == "multipart":
                name = _multipart_metadata(req.headers, req.body).get("name") or name
        req.mutates = True
        if upload_type == "multipart":
            req.metadata = _custom_metadata(_multipart_metadata(req.headers, req.body))
        elif upload_type == "resumable":
            req.metadata = _custom_metadata(_json_body(req.body))
        if isinstance(name, str) and name:
            req.key = (bucket, name)
            req.checks = _query_checks(q, req.key)
        return
    if parts[:4] == ["download", "storage", "v1", "b"] and len(parts) >= 7:
        req.kind, req.key = "download", (parts[4], "/".join(parts[6:]))
        return
    if parts[:3] != ["storage", "v1", "b"]:
        return  # batch endpoint, XML API...: forwarded as "other"
    if len(parts) < 5 or parts[4] != "o":
        req.kind = "bucket"
        return
    bucket = parts[3]
    if len(parts) == 5:
        req.kind = "list"
        return
    # The object name is one percent-encoded segment, so anything after it is a sub-resource.
    key = (bucket, parts[5])
    rest = parts[6:]
    if not rest:
        req.key = key
        req.kind = {
            "GET": "download" if q.get("alt") == "media" else "get",
            "HEAD": "get",
            "DELETE": "delete",
            "PATCH": "patch",
            "PUT": "update",
        }.get(req.method, "other")
        req.mutates = req.method in ("DELETE", "PATCH", "PUT")
        if req.mutates:
            req.checks = _query_checks(q, key)
        if req.method in ("PATCH", "PUT"):
            req.metadata = _custom_metadata(_json_body(req.body))
        return
    if rest == ["compose"] and req.method == "POST":
        req.kind, req.key, req.mutates = "compose", key, True
        req.checks = _query_checks(q, key)
        compose_body = _json_body(req.body)
        destination = compose_body.get("destination")
        req.metadata = _custom_metadata(destination if isinstance(destination, dict) else {})
        sources = compose_body.get("sourceObjects") or []
        req.sources = len(sources) if isinstance(sources, list) else 0
        for source in sources if isinstance(sources, list) else []:
            pre = source.get("objectPreconditions") if isinstance(source, dict) else None
            if isinstance(pre, dict) and "ifGenerationMatch" in pre:
                src = (bucket, str(source.get("name")))
                req.checks.append(_Check(src, "generation", True, int(pre["ifGenerationMatch"])))
        return
    if len(rest) >= 5 and rest[0] in ("rewriteTo", "copyTo") and rest[1] == "b" and rest[3] == "o":
        req.kind = "rewrite" if rest[0] == "rewriteTo" else "copy"
        req.key, req.mutates = (rest[2], "/".join(rest[4:])), True
        req.checks = _query_checks(q, req.key) + _query_checks(q, key, prefix="ifSource")
        return
    req.key = key


# -- programmed behaviour --------------------------------------------------------------------------


@dataclass
class _Match:
    method: str | None = None
    kind: str | None = None
    path_contains: str | None = None
    object_name: str | None = None
    # Every object whose name starts with it, e.g. one test's uploads on a shared deployment.
    object_prefix: str | None = None

    def __call__(self, req: _Request) -> bool:
        return (
            (self.method is None or req.method == self.method.upper())
            and (self.kind is None or req.kind == self.kind)
            and (
                self.path_contains is None or self.path_contains in urllib.parse.unquote(req.target)
            )
            and (
                self.object_name is None or (req.key is not None and req.key[1] == self.object_name)
            )
            and (
                self.object_prefix is None
                or (req.key is not None and req.key[1].startswith(self.object_prefix))
            )
        )


@dataclass
class Hold:
    """A parked request: ``arrived`` is set once it reaches the proxy; ``release()`` frees it."""

    arrived: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def wait_arrived(self, timeout: float = 10.0) -> bool:
        return self.arrived.wait(timeout)

    def release(self) -> None:
        self.released.set()


@dataclass
class _Rule:
    match: _Match
    remaining: int
    action: Literal["fail", "stall", "hold"]
    status: int = 503
    seconds: float = 0.0
    after: bool = False
    hold: Hold | None = None


@dataclass(frozen=True)
class Exchange:
    """One request as the proxy saw it, and what it answered."""

    method: str
    kind: str
    object_name: str | None
    status: int
    fault: str | None  # the programmed rule applied to it: "fail", "stall", "hold" or None
    refused: bool  # the proxy answered itself: a precondition, limit or policy refused it
    seconds: float


# -- the proxy -----------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: GcsProxy


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        return  # quiet: the exchanges are recorded instead

    def _dispatch(self) -> None:
        try:
            self.server.proxy._handle(self)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client gave up (e.g. its timeout fired)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _dispatch

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def respond(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP and name.lower() not in ("content-length", "date"):
                self.send_header(name, value)
        if self.command == "HEAD":
            length = next((v for k, v in headers if k.lower() == "content-length"), "0")
            self.send_header("Content-Length", length)
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()


@dataclass(frozen=True)
class _Upstream:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def _error(status: int, message: str) -> _Upstream:
    reason = _ERROR_REASONS.get(status, "error")
    body = {"error": {"code": status, "message": message, "errors": [
        {"reason": reason, "message": message, "domain": "global"}
    ]}}  # fmt: skip
    return _Upstream(
        status,
        [("Content-Type", "application/json; charset=UTF-8")],
        json.dumps(body).encode(),
    )


def _precondition_failed() -> _Upstream:
    body = {"error": {"code": 412, "message": "conditionNotMet", "errors": [
        {"reason": "conditionNotMet", "message": "Precondition Failed", "domain": "global",
         "locationType": "header", "location": "If-Match"}
    ]}}  # fmt: skip
    return _Upstream(
        412,
        [("Content-Type", "application/json; charset=UTF-8")],
        json.dumps(body).encode(),
    )


@dataclass(frozen=True)
class BucketPolicy:
    """Bucket settings the proxy presents (``None``: leave the emulator's answer alone)."""

    soft_delete_seconds: int | None = None
    versioning: bool | None = None
    storage_class: str | None = None
    retention_seconds: int | None = None
    retention_locked: bool = False
    object_storage_class: str | None = None


def _forbidden(message: str, reason: str) -> _Upstream:
    body = {"error": {"code": 403, "message": message, "errors": [
        {"reason": reason, "message": message, "domain": "global"}
    ]}}  # fmt: skip
    return _Upstream(
        403, [("Content-Type", "application/json; charset=UTF-8")], json.dumps(body).encode()
    )


def _rate_limited(key: ObjectKey) -> _Upstream:
    message = (
        f"The object {key[0]}/{key[1]} exceeded the rate limit for object mutation operations "
        "(create, update, and delete). Please reduce your request rate."
    )
    return _error(429, message)


class GcsProxy:
    """A precondition-enforcing, fault-injecting HTTP proxy in front of a GCS emulator URL.

    ``mutation_interval`` (seconds) turns on GCS's per-object write rate: a mutation of an object
    name sooner than that after the previous one forwarded is answered 429.
    """

    def __init__(
        self,
        upstream: str,
        *,
        enforce_preconditions: bool = True,
        mutation_interval: float | None = None,
    ) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"GcsProxy needs an http://host:port emulator URL, got {upstream!r}")
        self.upstream = f"http://{parsed.hostname}:{parsed.port or 80}"
        self._upstream_host = parsed.hostname
        self._upstream_port = parsed.port or 80
        self.enforce_preconditions = enforce_preconditions
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._mutex = threading.Lock()
        self._rules: list[_Rule] = []
        self._exchanges: list[Exchange] = []
        self._object_locks: dict[ObjectKey, threading.Lock] = {}
        self._uploads: dict[str, tuple[ObjectKey | None, list[_Check]]] = {}
        self.mutation_interval = mutation_interval
        self._last_mutation: dict[ObjectKey, float] = {}
        self._policies: dict[str, BucketPolicy] = {}
        self._holds_placed: set[ObjectKey] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("GcsProxy is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> str:
        """Bind 127.0.0.1 on an ephemeral port, serve in a daemon thread; return the URL."""
        if self._server is None:
            server = _Server(("127.0.0.1", 0), _Handler)
            server.proxy = self
            self._server = server
            self._closing.clear()
            self._thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05},
                name="gcs-proxy", daemon=True,
            )  # fmt: skip
            self._thread.start()
        return self.url

    def close(self) -> None:
        """Stop serving; parked and stalled requests are let go."""
        self._closing.set()
        with self._mutex:
            for rule in self._rules:
                if rule.hold is not None:
                    rule.hold.release()
            self._rules.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- programming it ----------------------------------------------------------------------

    def fail_next(
        self,
        n: int = 1,
        status: int = 503,
        *,
        method: str | None = None,
        kind: str | None = None,
        path_contains: str | None = None,
        object_name: str | None = None,
        after: bool = False,
    ) -> None:
        """Answer the next ``n`` matching requests with ``status`` (a GCS-style JSON error).

        By default the request never reaches the emulator; with ``after=True`` it is forwarded
        and only its response is replaced: the operation happened but the client saw an error
        (a lost response), so a client retry meets its own earlier effect.
        """
        match = _Match(method, kind, path_contains, object_name)
        self._add(_Rule(match, n, "fail", status=status, after=after))

    def stall_next(
        self,
        n: int = 1,
        seconds: float = 5.0,
        *,
        method: str | None = None,
        kind: str | None = None,
        path_contains: str | None = None,
        object_name: str | None = None,
        object_prefix: str | None = None,
        after: bool = False,
    ) -> None:
        """Delay the next ``n`` matching requests by ``seconds``, then carry on normally.

        By default the delay is before forwarding (the request reaches the emulator late, even
        after the client timed out and retried: preconditions are checked when it arrives);
        with ``after=True`` the emulator acts at once and only the response is late.
        """
        match = _Match(method, kind, path_contains, object_name, object_prefix)
        self._add(_Rule(match, n, "stall", seconds=seconds, after=after))

    def hold(
        self,
        *,
        method: str | None = None,
        kind: str | None = None,
        path_contains: str | None = None,
        object_name: str | None = None,
    ) -> Hold:
        """Park the next matching request before forwarding it, until ``Hold.release()``."""
        hold = Hold()
        self._add(_Rule(_Match(method, kind, path_contains, object_name), 1, "hold", hold=hold))
        return hold

    def present_bucket(self, bucket: str, policy: BucketPolicy) -> None:
        """Make ``bucket`` look (and, for retention, behave) as configured by ``policy``."""
        with self._mutex:
            self._policies[bucket] = policy

    def place_hold(self, bucket: str, name: str) -> None:
        """Put a temporary hold on an object: it reads as held and cannot be replaced or deleted."""
        with self._mutex:
            self._holds_placed.add((bucket, name))

    def clear_rules(self) -> None:
        """Forget pending faults; parked requests are released."""
        with self._mutex:
            for rule in self._rules:
                if rule.hold is not None:
                    rule.hold.release()
            self._rules.clear()

    def reset_stats(self) -> None:
        with self._mutex:
            self._exchanges.clear()

    def _add(self, rule: _Rule) -> None:
        if rule.remaining < 1:
            raise ValueError("n must be at least 1")
        with self._mutex:
            self._rules.append(rule)

    def _take_rule(self, req: _Request) -> _Rule | None:
        with self._mutex:
            for rule in self._rules:
                if rule.match(req):
                    rule.remaining -= 1
                    if rule.remaining == 0:
                        self._rules.remove(rule)
                    return rule
        return None

    # -- observing it ------------------------------------------------------------------------

    @property
    def exchanges(self) -> list[Exchange]:
        with self._mutex:
            return list(self._exchanges)

    @property
    def stats(self) -> Counter[tuple[str, str, int]]:
        """How many requests were answered, per ``(method, kind, status)``."""
        return Counter((e.method, e.kind, e.status) for e in self.exchanges)

    def count(
        self,
        *,
        method: str | None = None,
        kind: str | None = None,
        status: int | None = None,
        object_name: str | None = None,
        fault: str | None = None,
        refused: bool | None = None,
    ) -> int:
        """How many exchanges match every given filter."""
        return sum(
            1
            for e in self.exchanges
            if (method is None or e.method == method.upper())
            and (kind is None or e.kind == kind)
            and (status is None or e.status == status)
            and (object_name is None or e.object_name == object_name)
            and (fault is None or e.fault == fault)
            and (refused is None or e.refused == refused)
        )

    # -- serving -----------------------------------------------------------------------------

    def _handle(self, handler: _Handler) -> None:
        started = time.monotonic()
        split = urllib.parse.urlsplit(handler.path)
        req = _Request(
            method=handler.command,
            path=split.path,
            target=handler.path,
            query=dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True)),
            headers=list(handler.headers.items()),
            body=handler.read_body(),
        )
        _classify(req)
        if req.upload_id is not None:
            with self._mutex:
                req.key, req.checks = self._uploads.get(req.upload_id, (None, []))
            if not _is_final_chunk(req.headers):
                req.checks = []  # GCS decides the precondition when the object is created
        rule = self._take_rule(req)
        refused = False
        if rule is not None and not rule.after:
            self._apply_before(rule)
        if rule is not None and rule.action == "fail" and not rule.after:
            response = _error(rule.status, f"injected by GcsProxy: HTTP {rule.status}")
        else:
            response, refused = self._guarded_forward(req)
            if rule is not None and rule.after:
                if rule.action == "stall":
                    self._closing.wait(rule.seconds)
                elif rule.action == "fail":
                    response = _error(rule.status, f"injected by GcsProxy: HTTP {rule.status}")
        with self._mutex:
            self._exchanges.append(
                Exchange(
                    req.method,
                    req.kind,
                    req.key[1] if req.key else None,
                    response.status,
                    rule.action if rule is not None else None,
                    refused,
                    time.monotonic() - started,
                )
            )
        handler.respond(response.status, response.headers, response.body)

    def _apply_before(self, rule: _Rule) -> None:
        if rule.action == "stall":
            self._closing.wait(rule.seconds)
        elif rule.action == "hold" and rule.hold is not None:
            rule.hold.arrived.set()
            rule.hold.released.wait(_HOLD_LIMIT_SECONDS)

    def _guarded_forward(self, req: _Request) -> tuple[_Upstream, bool]:
        """Check the preconditions and forward, holding the locks of every object involved.

        The flag says the proxy itself refused the request (412) without forwarding it.
        """
        keys = {check.key for check in req.checks}
        if req.mutates and req.key is not None:
            keys.add(req.key)
        with ExitStack() as stack:
            for key in sorted(keys):
                stack.enter_context(self._lock_of(key))
            refusal = self._limits_refusal(req)
            if refusal is not None:
                return refusal, True
            if self.enforce_preconditions and not all(self._holds(c) for c in req.checks):
                return _precondition_failed(), True
            response = self._forward(req)
            if req.mutates and req.key is not None and req.kind != "resumable-init":
                with self._mutex:
                    self._last_mutation[req.key] = time.monotonic()
            response = self._present_policies(req, response)
            if req.kind == "resumable-init" and response.status in (200, 201):
                location = next((v for k, v in response.headers if k.lower() == "location"), "")
                upload_id = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))
                if "upload_id" in upload_id:
                    with self._mutex:
                        self._uploads[upload_id["upload_id"]] = (req.key, req.checks)
            return response, False

    def _limits_refusal(self, req: _Request) -> _Upstream | None:
        """GCS's answer to a request beyond its limits or its policies, or None to go on."""
        if req.kind == "compose" and req.sources > MAX_COMPOSE_SOURCES:
            return _error(
                400,
                f"The number of source components provided ({req.sources}) exceeds the maximum "
                f"({MAX_COMPOSE_SOURCES})",
            )
        if req.metadata is not None and _metadata_bytes(req.metadata) > MAX_CUSTOM_METADATA_BYTES:
            return _error(
                400,
                f"Custom metadata is {_metadata_bytes(req.metadata)} bytes; the limit is "
                f"{MAX_CUSTOM_METADATA_BYTES} bytes",
            )
        if not req.mutates or req.key is None or req.kind == "resumable-init":
            return None
        if req.upload_id is not None and not _is_final_chunk(req.headers):
            return None
        with self._mutex:
            policy = self._policies.get(req.key[0])
            held = req.key in self._holds_placed
            last = self._last_mutation.get(req.key)
        retained = policy is not None and bool(policy.retention_seconds)
        if (held or retained) and self._exists(req.key):
            if held:
                return _forbidden(
                    f"Object '{req.key[0]}/{req.key[1]}' is under active Temporary hold and "
                    "cannot be deleted, overwritten or archived until hold is removed.",
                    "forbidden",
                )
            return _forbidden(
                f"Object '{req.key[0]}/{req.key[1]}' is subject to bucket's retention "
                "policy or object retention and cannot be deleted or overwritten until "
                "its retention expires.",
                "retentionPolicyNotMet",
            )
        if (
            self.mutation_interval is not None
            and last is not None
            and time.monotonic() - last < self.mutation_interval
        ):
            return _rate_limited(req.key)
        return None

    def _exists(self, key: ObjectKey) -> bool:
        path = (
            f"/storage/v1/b/{urllib.parse.quote(key[0], safe='')}"
            f"/o/{urllib.parse.quote(key[1], safe='')}"
        )
        try:
            status, _, _ = self._call("GET", path, [], b"")
        except OSError:
            return False
        return status == 200

    def _present_policies(self, req: _Request, response: _Upstream) -> _Upstream:
        """Rewrite bucket and object resources so they carry the policies the test set."""
        if response.status != 200 or req.method not in ("GET", "POST", "PATCH", "PUT"):
            return response
        parts = _segments(req.path)
        bucket = parts[3] if parts[:3] == ["storage", "v1", "b"] and len(parts) >= 4 else None
        if req.key is not None:
            bucket = req.key[0]
        with self._mutex:
            policy = self._policies.get(bucket or "")
            held = req.key in self._holds_placed if req.key is not None else False
        if policy is None and not held:
            return response
        try:
            resource = json.loads(response.body)
        except ValueError:
            return response
        if not isinstance(resource, dict):
            return response
        if req.kind == "bucket" and len(parts) == 4 and policy is not None:
            _apply_bucket_policy(resource, policy)
        elif req.key is not None and resource.get("kind") == "storage#object":
            if policy is not None and policy.object_storage_class:
                resource["storageClass"] = policy.object_storage_class
            if held:
                resource["temporaryHold"] = True
        else:
            return response
        return _Upstream(response.status, response.headers, json.dumps(resource).encode())

    def _lock_of(self, key: ObjectKey) -> threading.Lock:
        with self._mutex:
            return self._object_locks.setdefault(key, threading.Lock())

    def _holds(self, check: _Check) -> bool:
        bucket, name = check.key
        path = (
            f"/storage/v1/b/{urllib.parse.quote(bucket, safe='')}"
            f"/o/{urllib.parse.quote(name, safe='')}"
        )
        try:
            status, _, body = self._call("GET", path, [], b"")
        except OSError:
            return True  # the emulator is unreachable: forwarding will answer 502
        if status == 404:
            current = 0  # a missing object has generation 0 (and no metageneration to match)
        elif status == 200:
            current = int(json.loads(body).get(check.field, 0))
        else:
            return True  # cannot tell: let the emulator answer
        if check.field == "metageneration" and status == 404:
            return not check.equal
        return (current == check.value) == check.equal

    def _forward(self, req: _Request) -> _Upstream:
        media = req.kind == "download"
        headers = [
            (k, v)
            for k, v in req.headers
            if k.lower() not in _HOP_BY_HOP
            and k.lower() not in ("host", "content-length")
            and (media or k.lower() != "accept-encoding")  # JSON must come back rewritable
        ]
        try:
            status, out_headers, body = self._call(req.method, req.target, headers, req.body)
        except OSError as error:
            return _error(502, f"GcsProxy: emulator at {self.upstream} unreachable: {error}")
        out_headers = [
            (k, self._rewrite(v) if k.lower() == "location" else v) for k, v in out_headers
        ]
        content_type = next((v for k, v in out_headers if k.lower() == "content-type"), "")
        encoded = any(k.lower() == "content-encoding" for k, _ in out_headers)
        if not media and "json" in content_type and not encoded:
            body = self._rewrite(body.decode("utf-8", "replace")).encode()
        return _Upstream(status, out_headers, body)

    def _rewrite(self, text: str) -> str:
        return text.replace(self.upstream, self.url) if self._server is not None else text

    def _call(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self._upstream_host, self._upstream_port, timeout=300)
        try:
            conn.putrequest(method, target, skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            if body or method in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body if body else None)
            response = conn.getresponse()
            data = response.read()
            return response.status, response.getheaders(), data
        finally:
            conn.close()


def _apply_bucket_policy(resource: dict[str, object], policy: BucketPolicy) -> None:
    effective = "2026-01-01T00:00:00Z"
    if policy.soft_delete_seconds is not None:
        resource["softDeletePolicy"] = {
            "retentionDurationSeconds": str(policy.soft_delete_seconds),
            "effectiveTime": effective,
        }
    if policy.versioning is not None:
        resource["versioning"] = {"enabled": policy.versioning}
    if policy.storage_class is not None:
        resource["storageClass"] = policy.storage_class
    if policy.retention_seconds is not None:
        resource["retentionPolicy"] = {
            "retentionPeriod": str(policy.retention_seconds),
            "effectiveTime": effective,
            "isLocked": policy.retention_locked,
        }


def _is_final_chunk(headers: list[tuple[str, str]]) -> bool:
    """Whether a resumable PUT completes the upload: ``bytes a-b/total`` with ``b + 1 == total``."""
    content_range = next((v for k, v in headers if k.lower() == "content-range"), "")
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", content_range)
    if not content_range:
        return True  # the whole object in one request
    if match is None or match.group(3) == "*":
        return False
    return match.group(2) is None or int(match.group(2)) + 1 == int(match.group(3))
