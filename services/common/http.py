"""The HTTP edge shared by the services: routes with their types, errors as problems, auth, idempotency,
health, metrics, OpenAPI, and a server with graceful shutdown.

One middleware (`edge_middleware`) does, outermost first: the request id and the access log line → metrics (counts
and times what the client saw, problems included) → errors (every failure becomes a problem+json) → rate limit per principal → time limit → handler. Authentication is explicit in each
handler (`principal(request)`), so a reader sees the roles next to the rule they protect.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import asyncpg
import msgspec
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from schemas.common import Problem
from schemas.limits import (
    BODY_BYTES_MAX, GC_YOUNG_OBJECTS, HEADER_FIELD_BYTES_MAX, HEADER_TIMEOUT_S, HEADERS_MAX, HTTP_IDLE_TIMEOUT_S,
    IDEMPOTENCY_KEY_LENGTH_MAX, LISTEN_BACKLOG_MAX, READY_CHECK_TIMEOUT_S, REQUEST_LINE_BYTES_MAX, SHUTDOWN_TIMEOUT_S,
)

from . import auth, db, dependencies, idempotency, jwks, kafka, metrics, ratelimit, request_ids, revocations, tasks
from .access_log import STATUS_CLIENT_GONE, AccessLog
from .errors import BadRequest, HeadersTooLarge, NotFound, PayloadTooLarge, RateLimited, ServiceError, Unavailable, UriTooLong, ValidationFailed
from .settings import Settings

log = logging.getLogger("cvl.http")
db_log = logging.getLogger("cvl.http.database")  # one line per failed request while it is down: quieted (logs.Repeats)

T = TypeVar("T")
JSON: Final = "application/json"
PROBLEM_JSON: Final = "application/problem+json"
SETTINGS: Final = web.AppKey("settings", Settings)
READY: Final = web.AppKey("ready", Callable[[], Awaitable[dict[str, bool]]])
ROUTES: Final = web.AppKey("routes", list)
VERIFIER: Final = web.AppKey("verifier", auth.Verifier)
JWKS_PATH: Final = "/.well-known/jwks.json"
JWK_SET_JSON: Final = "application/jwk-set+json"

_encoder = msgspec.json.Encoder()


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    summary: str
    roles: tuple[str, ...] = ()
    body: type | None = None
    response: type | None = None
    status: int = 200
    params: dict[str, Any] = field(default_factory=dict)  # path and query parameters: name -> type
    required: tuple[str, ...] = ()  # query parameters without a default (path parameters always are)


# --- responses -------------------------------------------------------------------------------------------------------

def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_encoder.encode(obj), status=status, content_type=JSON, headers=headers)


def problem(err: ServiceError) -> Problem:
    """The problem of a failure, with the id of the request being answered (`request_ids.current`), if any."""
    return Problem(type=f"https://cvl.example/problems/{err.code.replace('_', '-')}", title=err.title,
                   status=err.status, detail=err.detail, code=err.code, field=err.field,
                   request_id=request_ids.current.get())


def problem_response(err: ServiceError) -> web.Response:
    headers = {"Retry-After": str(err.retry_after_s)} if err.retry_after_s is not None else None
    return web.Response(body=_encoder.encode(problem(err)), status=err.status, content_type=PROBLEM_JSON,
                        headers=headers)


# --- input -----------------------------------------------------------------------------------------------------------

def _field_of(message: str) -> str | None:
    # msgspec says "... - at `$.vouchers[3].amount`"
    if "- at `$" in message:
        path = message.rsplit("- at `$", 1)[1].rstrip("`")
        return path.lstrip(".") or None
    if message.startswith("Object missing required field `"):
        return message.split("`")[1]
    if message.startswith("Object contains unknown field `"):
        return message.split("`")[1]
    return None


async def read_body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > BODY_BYTES_MAX:
        raise PayloadTooLarge(f"the body is {request.content_length} bytes; at most {BODY_BYTES_MAX}")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(f"the body exceeds {BODY_BYTES_MAX} bytes") from exc


_decoders: dict[Any, msgspec.json.Decoder] = {}  # one per request type, built on first use


def _decoder(type_: Any) -> msgspec.json.Decoder:
    if (decoder := _decoders.get(type_)) is None:
        decoder = _decoders[type_] = msgspec.json.Decoder(type_)
    return decoder


def decode(raw: bytes, type_: type[T]) -> T:
    if not raw:
        raise ValidationFailed("a JSON body is required")
    try:
        return _decoder(type_).decode(raw)
    except msgspec.ValidationError as exc:
        field_ = _field_of(str(exc))
        raise ValidationFailed(str(exc), field=field_) from exc
    except msgspec.DecodeError as exc:
        raise ValidationFailed(f"the body is not valid JSON: {exc}") from exc


def param(request: web.Request, name: str, type_: Any, *, query: bool = False, default: Any = ...) -> Any:
    """A path (or query) parameter converted to `type_` with its limits; bad values are 422 naming it."""
    source = request.rel_url.query if query else request.match_info
    if name not in source:
        if default is not ...:
            return default
        raise ValidationFailed(f"parameter {name} is required", field=name)
    raw: Any = source[name]
    try:
        return msgspec.convert(raw, type_, strict=False)
    except msgspec.ValidationError as exc:
        raise ValidationFailed(f"parameter {name}: {exc}", field=name) from exc


def principal(request: web.Request) -> auth.Principal:
    return request.app[VERIFIER].verify(request.headers.get("Authorization"))


# --- idempotency (the rules live in services.common.idempotency; the edge reads the header, writes the reply) ------

def idempotency_key(request: web.Request, who: auth.Principal, raw_body: bytes) -> idempotency.Key | None:
    return idempotency.key_of(request.headers.get(idempotency.HEADER), who.subject, request.method,
                              request.rel_url.path, raw_body)


def answer(a: idempotency.Answer) -> web.Response:
    """A command's answer as an HTTP response; a stored answer played again says so (`Idempotent-Replayed`)."""
    return web.Response(body=a.body, status=a.status, content_type=JSON,
                        headers={"Idempotent-Replayed": "true"} if a.replayed else None)



# --- middlewares -----------------------------------------------------------------------------------------------------

def failure_response(request: web.Request, exc: Exception) -> web.Response:
    """Any failure of a request as a problem+json (a ServiceError as itself; the rest by what it means)."""
    if isinstance(exc, ServiceError):
        return problem_response(exc)
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return problem_response(PayloadTooLarge(f"the body exceeds {BODY_BYTES_MAX} bytes"))
    if isinstance(exc, web.HTTPNotFound):
        return problem_response(NotFound(f"no route for {request.method} {request.rel_url.path}"))
    if isinstance(exc, web.HTTPMethodNotAllowed):
        err = ServiceError(f"{request.method} is not allowed here; use {', '.join(sorted(exc.allowed_methods))}")
        err.status, err.code, err.title = 405, "method_not_allowed", "Method not allowed"
        return problem_response(err)
    if isinstance(exc, web.HTTPException):
        err = ServiceError(exc.text or exc.reason)
        err.status, err.code, err.title = exc.status, "http_error", exc.reason
        return problem_response(err)
    if isinstance(exc, (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)):
        # Transient: the transaction was rolled back whole, so a retry is safe.
        log.warning("transaction aborted, nothing written: %s", exc)
        return problem_response(Unavailable("the transaction collided with another and was rolled back; retry"))
    if isinstance(exc, TimeoutError):  # the request's time limit, or a connect or acquire wait inside it
        log.error("request timed out", extra={"method": request.method, "path": request.rel_url.path})
        return problem_response(Unavailable("the request did not finish in time; retry with the same "
                                            "Idempotency-Key"))
    # The database restarting or unreachable (a connection closed mid-transaction included) is 503 with
    # Retry-After, never a 500: the server rolled back what was in flight, so a retry is safe.
    if db.is_unavailable(exc):
        db_log.error("database unavailable: %r", exc, extra={"method": request.method,
                                                              "path": request.rel_url.path})
        return problem_response(Unavailable("the database is not reachable now; retry with the same "
                                            "Idempotency-Key"))
    log.error("unhandled error", exc_info=exc, extra={"method": request.method, "path": request.rel_url.path})
    return problem_response(ServiceError("an internal error occurred; it has been logged"))


class Deadlines:
    """The request time limit, with the semantics of `asyncio.timeout` around the handler but without a timer and a
    context object per request: every request of an app has the same limit, so deadlines expire in arrival order,
    and ONE timer armed for the oldest request in flight serves them all. An expired request's task is cancelled;
    the cancellation that surfaces from the handler becomes a TimeoutError (503), exactly when asyncio.timeout would
    raise one (the task was not also cancelled by someone else); a handler that finishes anyway answers as it did.
    """

    def __init__(self, limit_s: float):
        self.limit_s = limit_s
        self._live: dict[asyncio.Task, tuple[float, int]] = {}  # in arrival order: (deadline, cancelling at entry)
        self._expired: dict[asyncio.Task, int] = {}  # cancelled by the time limit, still in the handler
        self._timer: asyncio.TimerHandle | None = None

    def enter(self, task: asyncio.Task) -> None:
        loop = task.get_loop()
        deadline = loop.time() + self.limit_s
        self._live[task] = (deadline, task.cancelling())
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire, loop)

    def leave(self, task: asyncio.Task, cancelled: bool) -> bool:
        """The request's handler returned or raised; True: `cancelled` is the time limit's cancellation."""
        if self._live.pop(task, None) is not None:
            return False
        # Expired (removed by _expire): take back the time limit's cancel request, as asyncio.timeout does.
        entry = self._expired.pop(task)
        return task.uncancel() <= entry and cancelled

    def _expire(self, loop) -> None:
        self._timer = None
        now = loop.time()
        expired = []
        for task, (deadline, cancelling) in self._live.items():
            if deadline > now:
                self._timer = loop.call_at(deadline, self._expire, loop)
                break
            expired.append((task, cancelling))
        for task, cancelling in expired:
            del self._live[task]
            self._expired[task] = cancelling
            task.cancel()


UNLIMITED_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes are never rate limited


def rate_limited(wait_s: float) -> RateLimited:
    err = RateLimited("this principal made more requests than its rate limit allows; retry later")
    err.retry_after_s = ratelimit.retry_after_s(wait_s)
    return err


def edge_middleware(service: str, request_timeout_s: float, verifier: auth.Verifier | None = None,
                    buckets: ratelimit.Buckets | None = None, access_log: AccessLog | None = None):
    """The one middleware of every service, in the order the layers used to nest (outermost first): the request id
    and the access line → metrics (count and time what the client saw, problems included) → errors (every failure
    becomes a problem+json) → the rate limit per principal → the request time limit → the handler. One frame per
    request instead of three, a deadline instead of an asyncio.timeout, and each route's metric children looked up
    once.

    The request id (services.common.request_ids) is set for the request's task before anything else, so problems
    and events carry it; every answer carries it as X-Request-Id, and `access_log` (when given) gets one line per
    request, with the same duration the latency metric observes.

    The rate limit's principal is the bearer token's subject (verified once, then from auth's cache), else the remote
    address (anonymous calls, and tokens that do not verify); UNLIMITED_PATHS are exempt."""
    deadlines = Deadlines(request_timeout_s)
    by_route: dict[tuple, _RouteMetrics] = {}
    perf_counter = time.perf_counter
    current_task = asyncio.current_task
    subject_of = verifier.subject_of if verifier is not None else (lambda authorization: None)
    take = buckets.take if buckets is not None else None
    request_id_of, set_request_id, request_id_header = request_ids.of, request_ids.current.set, request_ids.HEADER
    log_line = access_log.line if access_log is not None else None

    @web.middleware
    async def edge(request: web.Request, handler):
        started = perf_counter()
        headers = request.headers
        request_id = request_id_of(headers.get(request_id_header))
        set_request_id(request_id)
        wait_s = 0.0
        who = None
        if take is not None and request.path not in UNLIMITED_PATHS:
            authorization = headers.get("Authorization")
            who = subject_of(authorization) if authorization else None
            wait_s = take(who or f"remote:{request.remote}", started)
        if wait_s:
            response = failure_response(request, rate_limited(wait_s))
        else:
            task = current_task()
            assert task is not None
            deadlines.enter(task)
            try:
                response = await handler(request)
            except asyncio.CancelledError:
                if not deadlines.leave(task, True):
                    if log_line is not None:  # logged all the same: the access log has every request
                        log_line(request.method, request.path, STATUS_CLIENT_GONE, perf_counter() - started,
                                 request_id, who)
                    raise  # not ours (shutdown, a client gone): nothing to answer, nothing counted
                response = failure_response(request, TimeoutError())
            except Exception as exc:
                deadlines.leave(task, False)
                response = failure_response(request, exc)
                # Answered: its traceback goes, and with it the cycle exception → traceback → frame → exception
                # (a refusal a handler raises from a local or a command) that only the cyclic GC would free, with
                # every object those frames hold (stop-the-world pauses of 25-50 ms every ~0.3 s in the redemption
                # process under refusals, measured; tests/test_no_cycles.py).
                exc.__traceback__ = None
            except BaseException:
                deadlines.leave(task, False)
                raise
            else:
                deadlines.leave(task, False)
        route = request.match_info.route
        key = (route if route.resource is not None else None, request.method)
        if (m := by_route.get(key)) is None:
            label = route.resource.canonical if route.resource is not None else "unmatched"
            m = by_route[key] = _RouteMetrics(service, label, request.method)
        duration_s = perf_counter() - started
        m.latency.observe(duration_s)
        status = response.status
        if (counter := m.counts.get(status)) is None:
            counter = m.counts[status] = metrics.http_requests.labels(service, m.route, m.method, str(status))
        counter.inc()
        response.headers[request_id_header] = request_id
        if log_line is not None:
            log_line(request.method, request.path, status, duration_s, request_id, who)
        return response

    return edge


class _RouteMetrics:
    """A route's metric children, bound once (as many as the Prometheus registry itself keeps), not per request."""

    __slots__ = ("route", "method", "latency", "counts")

    def __init__(self, service: str, route: str, method: str):
        self.route, self.method = route, method
        self.latency = metrics.http_latency.labels(service, route, method)
        self.counts: dict[int, Any] = {}


# --- health, metrics, OpenAPI ----------------------------------------------------------------------------------------

def ready_check(pool: Callable[[], asyncpg.Pool], kafka_probe) -> Callable[[], Awaitable[dict[str, bool]]]:
    """The /readyz check of a service: PostgreSQL answers a query and Kafka a metadata request, now."""
    async def ready() -> dict[str, bool]:
        try:
            async with asyncio.timeout(READY_CHECK_TIMEOUT_S):
                pg = await pool().fetchval("SELECT true")
        except Exception:
            pg = False
        return {"postgres": bool(pg), "kafka": await kafka_probe.ping()}
    return ready


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "service": request.app[SETTINGS].service})


async def readyz(request: web.Request) -> web.Response:
    checks = await request.app[READY]()
    ok = all(checks.values())
    return json_response({"status": "ready" if ok else "not_ready", "checks": checks}, status=200 if ok else 503)


async def jwks_json(request: web.Request) -> web.Response:
    """RFC 7517 JWK Set: the public keys this service accepts tokens signed with (public; no token needed)."""
    return web.Response(body=request.app[VERIFIER].document, content_type=JWK_SET_JSON)


async def metrics_endpoint(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def openapi(service: str, routes: list[Route]) -> dict:
    types = {t for r in routes for t in (r.body, r.response) if t is not None} | {Problem}
    (schemas_, components) = msgspec.json.schema_components(sorted(types, key=lambda t: t.__name__),
                                                            ref_template="#/components/schemas/{name}")
    ref = dict(zip(sorted(types, key=lambda t: t.__name__), schemas_))
    problem_ref = {"content": {PROBLEM_JSON: {"schema": ref[Problem]}}}
    paths: dict[str, dict] = {}
    for r in routes:
        op: dict[str, Any] = {"summary": r.summary, "operationId": r.handler.__name__,
                              "responses": {}, "security": [{"bearer": []}] if r.roles else []}
        if r.roles:
            op["description"] = "Roles: " + ", ".join(r.roles)
        parameters = []
        for name, type_ in r.params.items():
            (schema,), _ = msgspec.json.schema_components([type_])
            where = "path" if "{" + name + "}" in r.path else "query"
            parameters.append({"name": name, "in": where, "required": where == "path" or name in r.required,
                               "schema": schema})
        if r.method == "POST":
            parameters.append({"name": "Idempotency-Key", "in": "header", "required": False,
                               "schema": {"type": "string", "minLength": 1,
                                          "maxLength": IDEMPOTENCY_KEY_LENGTH_MAX}})
        if parameters:
            op["parameters"] = parameters
        if r.body is not None:
            op["requestBody"] = {"required": True, "content": {JSON: {"schema": ref[r.body]}}}
        ok: dict[str, Any] = {"description": "OK"}
        if r.response is not None:
            ok["content"] = {JSON: {"schema": ref[r.response]}}
        op["responses"][str(r.status)] = ok
        op["responses"]["default"] = {"description": "A problem (RFC 9457)", **problem_ref}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": f"cvl {service} service", "version": "1.0.0"},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}},
    }


# --- app factory and server ------------------------------------------------------------------------------------------

def token_keys(settings: Settings, verifier: auth.Verifier) -> jwks.FileSource | jwks.UrlSource:
    """Where the service's public token keys come from: the identity provider's URL, else the JWK Set file."""
    if settings.token_jwks_url:
        source: jwks.FileSource | jwks.UrlSource = jwks.UrlSource(settings.token_jwks_url, verifier.set_keys)
    else:
        assert settings.token_jwks_file is not None, "settings.load fills in the default file"
        source = jwks.FileSource(settings.token_jwks_file, verifier.set_keys)
    verifier.on_unknown_kid = source.nudge
    return source


def tokens_context(settings: Settings, verifier: auth.Verifier):
    """Before the service answers: its public keys loaded, the revocations on the tokens topic read; then both
    followed in the background (a rotated key file within TOKEN_JWKS_FILE_CHECK_S, a revocation within a poll)."""
    async def context(app: web.Application):
        source = token_keys(settings, verifier)
        if isinstance(source, jwks.FileSource):
            try:
                source.load()
            except FileNotFoundError as exc:
                raise RuntimeError(f"no token keys at {source.path}: run `cvl token init` (make up does), or set "
                                   f"CVL_TOKEN_JWKS_FILE or CVL_TOKEN_JWKS_URL") from exc
        else:
            try:
                await source.load()
            except Exception as exc:  # the identity provider may come up later: refuse tokens until then
                log.error("token keys not fetched at start, retrying: %s", exc, extra={"url": source.url})
        await kafka.ensure_topics(settings, [settings.topic_tokens])
        listener = revocations.Listener(settings, verifier)
        await listener.start()
        background = [asyncio.create_task(source.run(), name="token-keys"),
                      asyncio.create_task(listener.run(), name="token-revocations")]
        yield
        await tasks.cancel_all(background)
        await listener.stop()
    return context


def base_app(settings: Settings, routes: list[Route], ready: Callable[[], Awaitable[dict[str, bool]]]) -> web.Application:
    verifier = auth.Verifier(service=settings.service, issuer=settings.token_issuer, audience=settings.token_audience)
    access_log = AccessLog(settings.service)
    app = web.Application(client_max_size=BODY_BYTES_MAX,
                          middlewares=[edge_middleware(settings.service, settings.request_timeout_s, verifier,
                                                       ratelimit.Buckets(settings.rate_limit_per_s,
                                                                         settings.rate_limit_burst),
                                                       access_log)])

    async def flush_access_log(app: web.Application) -> None:  # the drained requests' lines, before the exit
        access_log.flush()
    app[SETTINGS] = settings
    app[VERIFIER] = verifier
    # First of the app's contexts: its startup runs before the service's own (pool, consumers), its cleanup after.
    app.cleanup_ctx.append(tokens_context(settings, verifier))
    app.on_cleanup.append(flush_access_log)
    app[READY] = ready
    app[ROUTES] = routes
    document = _encoder.encode(openapi(settings.service, routes))

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=document, content_type=JSON)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get(JWKS_PATH, jwks_json)
    for r in routes:
        app.router.add_route(r.method, r.path, r.handler, name=r.handler.__name__)
    return app


def tune_gc() -> None:
    """The cyclic garbage collector, tuned for services that allocate thousands of short-lived objects per batch
    (structs, rows, tuples) which reference counting frees: the young generation is collected every GC_YOUNG_OBJECTS
    allocations rather than 700 (fewer passes over a batch that is still alive), and what exists at start (modules,
    classes, schemas) is frozen out of the full collections. Measured in the issuing process under the bench:
    collection time 7.8% of its CPU before, 0.3% after."""
    gc.set_threshold(GC_YOUNG_OBJECTS, *gc.get_threshold()[1:])
    gc.freeze()


# --- connections: header and idle time, and what the parser refuses ---------------------------------------------------

class EdgeRequestHandler(RequestHandler):
    """aiohttp's connection protocol with two changes, neither of which costs anything per request:

    - The head of a connection's first request must arrive within `header_timeout_s` of connecting (slow-header
      clients). aiohttp arms its keep-alive check at connection_made with the idle limit, and that check closes a
      connection still waiting for a complete request head; we only bring its first deadline forward. After each
      answer aiohttp re-arms it with the idle limit (keepalive_timeout), so a later head, or silence, is bounded
      by HTTP_IDLE_TIMEOUT_S. One timer per connection, none per request.
    - What the HTTP parser refuses (too many or too large headers, a malformed request) is a problem+json with a
      `code` and a warning line, not aiohttp's text/plain 400 and an error with a stack trace: it is the client's
      mistake. The request never reached the middleware, so it has no access line or metric.
    """

    __slots__ = ("_header_timeout_s",)

    def __init__(self, manager: Server, *, header_timeout_s: float = HEADER_TIMEOUT_S, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._header_timeout_s = header_timeout_s

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        # Relies on aiohttp 3.14's keep-alive fields (tests/test_connections.py checks the behaviour).
        if self._keepalive_handle is not None and self._header_timeout_s < self._keepalive_timeout:
            self._keepalive_handle.cancel()
            self._next_keepalive_close_time = self._loop.time() + self._header_timeout_s
            self._keepalive_handle = self._loop.call_at(self._next_keepalive_close_time, self._process_keepalive)

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status != 400 or not isinstance(exc, BadHttpMessage):
            return super().handle_error(request, status, exc, message)
        err: ServiceError
        if isinstance(exc, LineTooLong):
            limit = exc.args[1]
            err = (UriTooLong(f"the request line exceeds {REQUEST_LINE_BYTES_MAX} bytes")
                   if limit == REQUEST_LINE_BYTES_MAX else
                   HeadersTooLarge(f"a header field exceeds {HEADER_FIELD_BYTES_MAX} bytes"))
        elif exc.message == "Too many headers received":
            err = HeadersTooLarge(f"more than {HEADERS_MAX} header fields")
        else:
            err = BadRequest(f"the request is not valid HTTP: {exc.message}")
        request_id = request_ids.new()  # the connection's task may still hold an earlier request's id
        request_ids.current.set(request_id)
        extra = {"code": err.code, "remote": request.remote, "request_id": request_id}
        # Non-HTTP traffic (TLS to a plain port, scanners) is common on an open port: debug, as aiohttp does.
        (log.debug if isinstance(exc, BadHttpMethod) else log.warning)("request refused by the HTTP parser: %s",
                                                                       exc.message, extra=extra)
        response = problem_response(err)
        response.headers[request_ids.HEADER] = request_id
        response.force_close()  # the parser's state is unknown after a refused head
        return response


class EdgeServer(Server):
    """aiohttp's low-level server, making EdgeRequestHandler connections."""

    def __call__(self) -> RequestHandler:
        return EdgeRequestHandler(self, loop=self._loop, **self._kwargs)


class EdgeRunner(web.AppRunner):
    """An AppRunner whose server makes EdgeRequestHandler connections (aiohttp builds the Server in the app; its
    class is the only thing changed)."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        assert type(server) is Server, "aiohttp's app makes a plain Server"
        server.__class__ = EdgeServer
        return server


def runner(app: web.Application, *, header_timeout_s: float = HEADER_TIMEOUT_S,
           idle_timeout_s: float = HTTP_IDLE_TIMEOUT_S) -> EdgeRunner:
    """The app's runner with the edge's connection limits (serve and the tests build it here)."""
    return EdgeRunner(app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                      keepalive_timeout=idle_timeout_s, header_timeout_s=header_timeout_s,
                      max_line_size=REQUEST_LINE_BYTES_MAX, max_field_size=HEADER_FIELD_BYTES_MAX,
                      max_headers=HEADERS_MAX)


def serve(settings: Settings, app_factory: Callable[[Settings], web.Application]) -> None:
    """Run until SIGTERM/SIGINT, then stop accepting, finish in-flight requests and run cleanups (drain)."""
    tune_gc()
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover
        pass

    async def main() -> None:
        app = app_factory(settings)
        app_runner = runner(app)
        await app_runner.setup()
        site = web.TCPSite(app_runner, settings.host, settings.port, backlog=LISTEN_BACKLOG_MAX, reuse_address=True)
        await site.start()
        log.info("listening", extra={"url": f"http://{settings.host}:{settings.port}"})
        watch = asyncio.create_task(dependencies.watch(app[READY]), name="dependencies")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down: draining requests, writers, relay and consumers")
        await tasks.cancel_all([watch])
        await app_runner.cleanup()
        log.info("stopped")

    asyncio.run(main())
