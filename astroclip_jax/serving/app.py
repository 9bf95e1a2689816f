"""``--mode=serve``: the similarity-search page and its JSON API over one trained run.

    python main.py --config=configs/spender.py --mode=serve --workdir=runs/default
    # then open http://127.0.0.1:8000/  (host and port: --config.serve.host / .port)

FastAPI (with uvicorn): typed query parameters checked before a handler runs, multipart
uploads, and sync handlers on a thread pool, so a slow upload does not stop other queries.

    GET  /                                the page (HTML + a little JavaScript, no build step)
    GET  /api/info                        the run: split, size, directions, limits, index
    GET  /api/search?direction=D&k=K&targetid=T        (or &random=1[&seed=S]) [&format=csv]
    POST /api/search  (multipart: file=<.npy|FITS>, direction=D, k=K[, format=csv])
    GET  /api/galaxy/<targetid>           every catalogue field of one galaxy
    GET  /api/galaxy/<targetid>/image.png | /spectrum.svg

Safe by default: bound to 127.0.0.1; answers only requests whose Host header names this
server (the bound host, localhost, or ``serve.allowed_hosts``: a web page elsewhere cannot
reach it through DNS rebinding); a client gets `HEADER_TIMEOUT_S` to send each request's
headers; no request names a file (pages are package data served from a fixed list; galaxies
are looked up by target id); an upload must declare its size, at most
``serve.max_upload_bytes``, and is validated from its headers before any data is decoded
(what it decodes to is bounded too: `queries.max_values`), then by shape, dtype and finite
values. Query parameters are typed and bounded, and unknown or repeated ones refused. A bad
request gets a 4xx JSON ``{"error": message}``, an unknown target id a 404; nothing a request
holds reaches a 500, and the server keeps serving.
"""

import collections
import logging
import re
import socket
from importlib import resources
from typing import Annotated

import h11
from fastapi import Depends, FastAPI, File, Form, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from astroclip_jax import settings as settings_lib
from astroclip_jax.errors import UserError
from astroclip_jax.evaluation import runner
from astroclip_jax.serving import queries
from astroclip_jax.serving.service import Service

STATIC = {"app.js": "text/javascript", "style.css": "text/css"}  # the only files served
_UPLOAD_OVERHEAD = 64 * 1024  # multipart headers and form fields around the file
# A browser or curl sends a request's line and headers at once; a client still sending them
# after this long is holding a connection open (slowloris), not asking a question. (uvicorn's
# keep-alive timeout, 5 s, is the same order.)
HEADER_TIMEOUT_S = 5.0
_LOOPBACK = ("localhost", "127.0.0.1", "::1")
_WILDCARD = ("0.0.0.0", "::", "")
UPLOAD_FIELDS = ("file", "direction", "k", "format")
# A Host header: a name or IPv4 address, or a bracketed IPv6 address, and an optional port
# (RFC 9110 section 7.2); anything else (user info, paths, spaces) is refused outright.
_HOST = re.compile(r"(?P<name>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")
_INT64 = {"ge": -2 ** 63, "le": 2 ** 63 - 1}  # target ids are int64 in every table
TargetId = Annotated[int, Path(**_INT64)]


def _page(name: str) -> str:
    return resources.files("astroclip_jax.serving").joinpath("static", name).read_text("utf-8")


def allowed_hosts(host: str, extra=()) -> frozenset[str]:
    """Host names the server answers to: the bound host, loopback names, this machine's name
    when bound to every interface, and ``serve.allowed_hosts`` ("*": any)."""
    names = {host.strip("[]").lower(), *_LOOPBACK, *(h.lower() for h in extra)}
    if host in _WILDCARD:
        names.add(socket.gethostname().lower())
    return frozenset(names)


def host_problem(header: str | None, allowed: frozenset[str]) -> str | None:
    """Why a request's Host header is refused, or None."""
    if "*" in allowed:
        return None
    match = _HOST.fullmatch(header or "")
    if match is not None and match["name"].strip("[]").lower() in allowed:
        return None
    return (f"Host header {header!r} is not a name of this server (DNS rebinding protection); "
            f"expected one of {sorted(allowed)} or a name listed in config field "
            "serve.allowed_hosts")


def _known_parameters(request: Request) -> None:
    """Every route's guard: a query parameter the route does not declare, or one given twice,
    is refused rather than silently ignored or overwritten."""
    route = request.scope.get("route")
    known = {p.alias for p in route.dependant.query_params} if route is not None else set()
    counts = collections.Counter(k for k, _ in request.query_params.multi_items())
    unknown = sorted(set(counts) - known)
    if unknown:
        raise queries.BadRequest(f"unknown query parameter(s) {unknown}; this path takes "
                                 f"{sorted(known) or 'none'}")
    repeated = sorted(k for k, n in counts.items() if n > 1)
    if repeated:
        raise queries.BadRequest(f"query parameter(s) {repeated} given more than once")


def create_app(service: Service, hosts: frozenset[str] = frozenset(_LOOPBACK)):
    """The FastAPI application over an opened `Service`, answering requests for ``hosts``
    (`allowed_hosts`)."""
    app = FastAPI(title="AstroCLIP similarity search", docs_url=None, redoc_url=None,
                  dependencies=[Depends(_known_parameters)])
    limit = service.settings.serve.max_upload_bytes
    log = logging.getLogger("astroclip_jax.serving")

    def error(status: int, message: str):
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(queries.BadRequest)
    async def bad_request(request, exc):
        return error(exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        parts = [f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
                 for e in exc.errors()]
        return error(422, "; ".join(parts))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def bug(request, exc):  # a bug, not the request's fault: logged, the server goes on
        log.exception("error answering %s", request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); see the server's log")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        problem = host_problem(request.headers.get("host"), hosts)
        if problem is not None:
            return error(400, problem)
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return error(411, "an upload must declare its Content-Length")
            if int(length) > limit + _UPLOAD_OVERHEAD:
                return error(413, f"the upload is {int(length)} bytes; at most {limit} bytes "
                                  "are accepted (config field serve.max_upload_bytes)")
        return await call_next(request)

    def answer(result, fmt: str):
        if fmt == "csv":
            return Response(queries.table_csv(result["neighbours"]), media_type="text/csv",
                            headers={"Content-Disposition": 'attachment; filename="neighbours.csv"'})
        if fmt != "json":
            raise queries.BadRequest(f"format is {fmt!r}; expected 'json' or 'csv'")
        return result

    @app.get("/", response_class=HTMLResponse)
    def page():
        return _page("index.html")

    @app.get("/static/{name}")
    def static(name: str):
        if name not in STATIC:
            raise queries.BadRequest(f"no page file {name!r}", status=404)
        return Response(_page(name), media_type=STATIC[name])

    @app.get("/api/info")
    def info():
        return service.info()

    @app.get("/api/search")
    def search(direction: str, k: int | None = None,
               targetid: Annotated[int | None, Query(**_INT64)] = None,
               random: bool = False,  # seeds: NumPy's SeedSequence takes integers >= 0
               seed: Annotated[int | None, Query(ge=0, le=2 ** 63 - 1)] = None,
               format: str = "json"):
        if targetid is None and not random:
            raise queries.BadRequest("give targetid=<id> or random=1 (or POST a file)")
        if targetid is not None and random:
            raise queries.BadRequest("give targetid=<id> or random=1, not both")
        if seed is not None and not random:
            raise queries.BadRequest("seed chooses the random galaxy: give it with random=1")
        k = service.settings.serve.k if k is None else k
        return answer(service.search(direction, k, targetid=targetid, random_seed=seed), format)

    @app.post("/api/search")
    async def search_upload(request: Request, file: UploadFile = File(...),
                            direction: str = Form(...), k: int | None = Form(None),
                            format: str = Form("json")):
        fields = collections.Counter(key for key, _ in (await request.form()).multi_items())
        unknown = sorted(set(fields) - set(UPLOAD_FIELDS))
        repeated = sorted(key for key, n in fields.items() if n > 1)
        if unknown or repeated:
            raise queries.BadRequest(f"form field(s) {unknown or repeated} "
                                     f"{'unknown' if unknown else 'given more than once'}; "
                                     f"an upload takes {list(UPLOAD_FIELDS)}, each once")
        content = await file.read(limit + 1)
        if len(content) > limit:
            raise queries.BadRequest(f"the file is larger than {limit} bytes (config field "
                                     "serve.max_upload_bytes)", status=413)
        k = service.settings.serve.k if k is None else k
        result = await run_in_threadpool(service.search, direction, k, upload=content)
        return answer(result, format)

    @app.get("/api/galaxy/{targetid}")
    def galaxy(targetid: TargetId):
        return service.galaxy(targetid)

    @app.get("/api/galaxy/{targetid}/image.png")
    def galaxy_image(targetid: TargetId):
        return Response(service.image_png(targetid), media_type="image/png")

    @app.get("/api/galaxy/{targetid}/spectrum.svg")
    def galaxy_spectrum(targetid: TargetId):
        return Response(service.spectrum_svg(targetid), media_type="image/svg+xml")

    return app


class _HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's line and headers. uvicorn
    0.55 has none (its keep-alive timer stops at a request's first byte), so a client sending
    header bytes slowly holds a connection for as long as it likes."""

    def connection_made(self, transport):
        self._deadline = None
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self):
        super().on_response_complete()
        self._arm()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc):
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _arm(self):
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(HEADER_TIMEOUT_S, self._expire)

    def _expire(self):
        # IDLE: h11 has not yet received a whole request line and headers.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound here so that a port already taken is the user's to change
    (one line, before any work) and port 0 becomes a real one to print."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart reuses its port
    try:
        sock.bind((host, port))
        # Listening at once holds the port while the index is built: with SO_REUSEADDR a
        # second server could otherwise bind it too and fail later, in uvicorn.
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise UserError(f"cannot serve on {host}:{port} ({err.strerror}); choose another "
                        "with --config.serve.port / --config.serve.host") from None
    return sock


def run(settings: settings_lib.RunSettings, workdir: str):
    """``--mode=serve``: open the run (building its index on first use), then serve until
    interrupted."""
    import uvicorn

    runner.require_split(settings, "serve")
    host = settings.serve.host
    sock = bind(host, settings.serve.port)
    with sock:
        with runner.evaluation_directory(workdir, "serve"):  # only while the index is built
            service = Service.open(settings, workdir)
        service.warm_up()
        import faiss

        # One thread per query: requests run side by side on the pool, and OpenMP teams on
        # busy cores make each query wait (benchmarks/search_index.py measures one thread too).
        faiss.omp_set_num_threads(1)
        port = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        print(f"serve: {service.index.n} galaxies of {workdir} on http://{shown}:{port}/ "
              "(Ctrl-C stops)", flush=True)
        app = create_app(service, allowed_hosts(host, settings.serve.allowed_hosts))
        uvicorn.Server(uvicorn.Config(app, http=_HeaderDeadline, log_level="warning")).run(
            sockets=[sock])
