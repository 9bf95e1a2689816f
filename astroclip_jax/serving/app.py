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

Safe by default: bound to 127.0.0.1; no request names a file (pages are package data served
from a fixed list; galaxies are looked up by target id); an upload must declare its size, at
most ``serve.max_upload_bytes``, and is validated (format by its first bytes, shape, dtype,
finite values). A bad request gets a 4xx JSON ``{"error": message}``, an unknown target id a
404; nothing a request holds reaches a 500, and the server keeps serving.
"""

import logging
import socket
from importlib import resources

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from astroclip_jax import settings as settings_lib
from astroclip_jax.errors import UserError
from astroclip_jax.evaluation import runner
from astroclip_jax.serving import queries
from astroclip_jax.serving.service import Service

STATIC = {"app.js": "text/javascript", "style.css": "text/css"}  # the only files served
_UPLOAD_OVERHEAD = 64 * 1024  # multipart headers and form fields around the file


def _page(name: str) -> str:
    return resources.files("astroclip_jax.serving").joinpath("static", name).read_text("utf-8")


def create_app(service: Service):
    """The FastAPI application over an opened `Service`."""
    app = FastAPI(title="AstroCLIP similarity search", docs_url=None, redoc_url=None)
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
    async def upload_size(request: Request, call_next):
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
    def search(direction: str, k: int | None = None, targetid: int | None = None,
               random: bool = False, seed: int | None = None, format: str = "json"):
        if targetid is None and not random:
            raise queries.BadRequest("give targetid=<id> or random=1 (or POST a file)")
        k = service.settings.serve.k if k is None else k
        return answer(service.search(direction, k, targetid=targetid, random_seed=seed), format)

    @app.post("/api/search")
    async def search_upload(file: UploadFile = File(...), direction: str = Form(...),
                            k: int | None = Form(None), format: str = Form("json")):
        content = await file.read(limit + 1)
        if len(content) > limit:
            raise queries.BadRequest(f"the file is larger than {limit} bytes (config field "
                                     "serve.max_upload_bytes)", status=413)
        k = service.settings.serve.k if k is None else k
        result = await run_in_threadpool(service.search, direction, k, upload=content)
        return answer(result, format)

    @app.get("/api/galaxy/{targetid}")
    def galaxy(targetid: int):
        return service.galaxy(targetid)

    @app.get("/api/galaxy/{targetid}/image.png")
    def galaxy_image(targetid: int):
        return Response(service.image_png(targetid), media_type="image/png")

    @app.get("/api/galaxy/{targetid}/spectrum.svg")
    def galaxy_spectrum(targetid: int):
        return Response(service.spectrum_svg(targetid), media_type="image/svg+xml")

    return app


def _check_port(host: str, port: int) -> None:
    """A port already taken is the user's to change: one line, before any work."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot serve on {host}:{port} ({err.strerror}); choose another "
                            "with --config.serve.port / --config.serve.host") from None


def run(settings: settings_lib.RunSettings, workdir: str):
    """``--mode=serve``: open the run (building its index on first use), then serve until
    interrupted."""
    import uvicorn

    host, port = settings.serve.host, settings.serve.port
    _check_port(host, port)
    with runner.evaluation_directory(workdir, "serve"):  # only while the index is built
        service = Service.open(settings, workdir)
    service.warm_up()
    import faiss

    # One thread per query: requests run side by side on the pool, and OpenMP teams on busy
    # cores make each query wait (benchmarks/search_index.py measures one thread too).
    faiss.omp_set_num_threads(1)
    print(f"serve: {service.index.n} galaxies of {workdir} on http://{host}:{port}/ "
          "(Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(service), host=host, port=port, log_level="warning")
