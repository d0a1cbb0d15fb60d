"""The FastAPI application: AUTOMATIC1111's ``/sdapi/v1`` routes, the page at ``/``, and the guards.

Guards, outermost first: HTTP basic auth on every route (page included) when credentials are set;
a body-size limit (413 before the body is read when ``Content-Length`` says so, and while reading
otherwise); CORS only for the origins given. Errors: a refused field is a 422 whose ``detail`` names it
(FastAPI's own shape, ``[{"loc": ["body", field], "msg": ..., "type": ...}]``); a full queue is 503;
anything unexpected is a 500 with one line, its traceback only in the server's log.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import secrets
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ldm.images import read_a1111_parameters
from ldm.sampling.registry import AUTOMATIC, SAMPLER_INFO, SCHEDULE_LABELS
from ldm.server import generation
from ldm.server.catalogue import Catalogue, ModelEntry
from ldm.server.limits import Limits, RequestError
from ldm.server.options import ServerOptions
from ldm.server.schemas import (GenerationResponse, Img2ImgRequest, PNGInfoRequest, PNGInfoResponse, ProgressResponse,
                                SamplerItem, SchedulerItem, ScriptsList, SDModelItem, TaskProgressRequest,
                                TaskProgressResponse, Txt2ImgRequest)
from ldm.server.worker import Job, JobFailed, QueueFull, Worker

logger = logging.getLogger(__name__)

STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}  # served from ldm/server/static/
WAIT_POLL_SECONDS = 0.25  # how often a waiting request checks that its client is still there


@dataclass
class Server:
    """Everything the routes share: the queue and its worker, the models, the settings and the limits."""

    worker: Worker
    catalogue: Catalogue
    options: ServerOptions
    limits: Limits
    credentials: dict[str, str] | None = None  # user -> password; None: no auth
    cors_origins: tuple[str, ...] = ()


def create_app(server: Server) -> FastAPI:
    """The application over a started :class:`Server` (its worker already holds the start-up model)."""
    app = FastAPI(title="tinysd-ldm", description="AUTOMATIC1111-compatible API", docs_url="/docs",
                  redoc_url=None)
    add_error_handlers(app)
    add_api_routes(app, server)
    add_page_routes(app)
    if server.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(server.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=bool(server.credentials))
    app.add_middleware(BodyLimit, max_bytes=server.limits.max_body_bytes)
    if server.credentials:
        app.add_middleware(BasicAuth, credentials=server.credentials)
    return app


# ---------------------------------------------------------------------- errors


def field_error(status: int, field: str | None, message: str) -> JSONResponse:
    """FastAPI's error shape for ``field`` (dotted: ``override_settings.sd_vae``, ``init_images.0``)."""
    location = ["body", *(int(part) if part.isdigit() else part for part in field.split("."))] if field else ["body"]
    return JSONResponse(status_code=status, content={"detail": [{"loc": location, "msg": message,
                                                                  "type": "value_error"}]})


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def refused(_request: Request, error: RequestError) -> JSONResponse:
        return field_error(error.status, error.field, error.message)

    @app.exception_handler(JobFailed)
    async def failed(_request: Request, error: JobFailed) -> JSONResponse:
        return field_error(error.status, error.field, error.message)

    @app.exception_handler(QueueFull)
    async def busy(_request: Request, error: QueueFull) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": f"busy: {error}; try again later"})

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI's shape, without echoing the input (it may be megabytes of base64).
        details = [{"loc": list(item.get("loc", ())), "msg": item.get("msg", ""), "type": item.get("type", "")}
                   for item in error.errors()]
        return JSONResponse(status_code=422, content={"detail": details})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(status_code=error.status_code, content={"detail": error.detail},
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, _error: Exception) -> JSONResponse:
        logger.exception("unexpected error in %s %s", request.method, request.url.path)
        return JSONResponse(status_code=500, content={"detail": "internal error (the server log has the details)"})


# ---------------------------------------------------------------------- guards (plain ASGI middleware)


class BasicAuth:
    """HTTP basic auth on every request; 401 with a ``WWW-Authenticate`` challenge otherwise."""

    def __init__(self, app, credentials: dict[str, str]) -> None:
        self.app = app
        self.credentials = {user.encode(): password.encode() for user, password in credentials.items()}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.authorised(dict(scope["headers"]).get(b"authorization", b"")):
            await self.app(scope, receive, send)
            return
        await JSONResponse(status_code=401, content={"detail": "Incorrect username or password"},
                           headers={"WWW-Authenticate": 'Basic realm="tinysd"'})(scope, receive, send)

    def authorised(self, header: bytes) -> bool:
        scheme, _, encoded = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        expected = self.credentials.get(user)
        # compare even for unknown users, so that timing does not tell which user names exist
        return secrets.compare_digest(password, expected if expected is not None else secrets.token_bytes(16)) \
            and expected is not None


class _BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` (an HTTPException, so that FastAPI's body reader lets it through)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body larger than this server's limit of {max_bytes} bytes")


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413: at once when ``Content-Length`` says so, else as
    soon as the bytes read pass the limit (chunked uploads)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self.refuse(scope, receive, send)
            return
        received, started = 0, False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self.refuse(scope, receive, send)

    async def refuse(self, scope, receive, send) -> None:
        await JSONResponse(status_code=413, content={"detail": f"request body larger than this server's limit "
                                                               f"of {self.max_bytes} bytes"},
                           headers={"Connection": "close"})(scope, receive, send)


# ---------------------------------------------------------------------- jobs


async def run_job(server: Server, request: Request, kind: str, model: ModelEntry, run, task_id: str | None = None):
    """Queue ``run`` and wait for it; if the client goes away meanwhile, the job is dropped or stopped."""
    job = server.worker.submit(kind, model, run, task_id, asyncio.get_running_loop())
    while not job.done.is_set():
        try:
            await asyncio.wait_for(asyncio.shield(job.future), timeout=WAIT_POLL_SECONDS)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                logger.info("the client of %s went away: its job is dropped", job.id)
                server.worker.abandon(job)
                raise JobFailed(499, "the client closed the connection")  # nobody reads this answer
    if job.error is not None:
        raise job.error
    return job.result


def add_api_routes(app: FastAPI, server: Server) -> None:
    async def generate(request: Request, body, kind: str, plan_fn) -> dict[str, Any]:
        plan = await run_in_threadpool(plan_fn, body, server.limits, server.catalogue, server.options)
        result = await run_job(server, request, kind, plan.model, plan.run, body.force_task_id)
        if plan.options_after:
            server.options.update(plan.options_after)
        parameters = body.model_dump()
        if kind == "img2img" and not body.include_init_images:
            parameters.update(init_images=None, mask=None)
        return {"images": result["images"], "parameters": parameters, "info": result["info"]}

    @app.post("/sdapi/v1/txt2img", response_model=GenerationResponse)
    async def txt2img(body: Txt2ImgRequest, request: Request):
        return await generate(request, body, "txt2img", generation.plan_txt2img)

    @app.post("/sdapi/v1/img2img", response_model=GenerationResponse)
    async def img2img(body: Img2ImgRequest, request: Request):
        return await generate(request, body, "img2img", generation.plan_img2img)

    @app.get("/sdapi/v1/progress", response_model=ProgressResponse)
    async def progress(skip_current_image: bool = False):
        job = server.worker.current
        if job is None:
            return {"progress": 0, "eta_relative": 0, "state": idle_state(server.worker.waiting)}
        image = None if skip_current_image else await run_in_threadpool(job.current_image)
        return {"progress": job.progress, "eta_relative": job.eta_relative, "current_image": image,
                "state": job_state(job, server.worker.waiting), "textinfo": None}

    @app.post("/internal/progress", response_model=TaskProgressResponse)
    async def task_progress(body: TaskProgressRequest):
        job = server.worker.find(body.id_task)
        if job is None:
            return {"active": False, "queued": False, "completed": False, "textinfo": "unknown task"}
        if job.state == "queued":
            ahead = server.worker.position(job)
            return {"active": False, "queued": True, "completed": False, "progress": 0.0, "queue_position": ahead,
                    "textinfo": f"In queue: {ahead} ahead" if ahead is not None else "In queue"}
        preview, preview_id = None, None
        if body.live_preview and job.state == "running" and job.preview_id != body.id_live_preview:
            image = await run_in_threadpool(job.current_image)
            preview, preview_id = (f"data:image/png;base64,{image}" if image else None), job.preview_id
        return {"active": job.state == "running", "queued": False, "completed": job.state == "done",
                "progress": job.progress, "eta": job.eta_relative, "live_preview": preview,
                "id_live_preview": preview_id if preview_id is not None else body.id_live_preview,
                "textinfo": f"image {job.job_no + 1} of {job.job_count}, step {job.sampling_step} of "
                            f"{job.sampling_steps}" if job.state == "running" else None}

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        server.worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip():
        server.worker.skip()
        return {}

    @app.get("/sdapi/v1/options")
    async def get_options():
        return server.options.snapshot()

    @app.post("/sdapi/v1/options")
    async def set_options(body: dict[str, Any], request: Request):
        changes = server.options.check(body)
        if "sd_model_checkpoint" in changes:
            entry = server.catalogue.resolve(changes["sd_model_checkpoint"], "sd_model_checkpoint")
            await run_job(server, request, "load", entry, lambda pipe, job: None)
            changes["sd_model_checkpoint"] = entry.title
        server.options.update(changes)
        return None

    @app.get("/sdapi/v1/sd-models", response_model=list[SDModelItem])
    async def sd_models():
        return [{"title": entry.title, "model_name": entry.model_name,
                 "filename": str(entry.path) if entry.path is not None else "(the model shipped in the package)"}
                for entry in server.catalogue.entries()]

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        await run_in_threadpool(server.catalogue.refresh)
        return None

    @app.get("/sdapi/v1/samplers", response_model=list[SamplerItem])
    async def samplers():
        return [{"name": info.a1111_name, "aliases": [name], "options": {}} for name, info in SAMPLER_INFO.items()]

    @app.get("/sdapi/v1/schedulers", response_model=list[SchedulerItem])
    async def schedulers():
        labelled = [(AUTOMATIC, "Automatic")] + [(name, label) for name, label in SCHEDULE_LABELS.items() if label]
        return [{"name": name, "label": label, "aliases": None, "default_rho": 7.0 if name == "karras" else -1,
                 "need_inner_model": False} for name, label in labelled]

    @app.get("/sdapi/v1/upscalers")
    async def upscalers():
        return [{"name": "Lanczos", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]

    @app.get("/sdapi/v1/latent-upscale-modes")
    async def latent_upscale_modes():
        return [{"name": "Latent"}]

    @app.get("/sdapi/v1/scripts", response_model=ScriptsList)
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @app.post("/sdapi/v1/png-info", response_model=PNGInfoResponse)
    async def png_info(body: PNGInfoRequest):
        return await run_in_threadpool(read_png_info, body.image, server.limits)


def idle_state(waiting: int) -> dict[str, Any]:
    return {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
            "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0, "queued": waiting}


def job_state(job: Job, waiting: int) -> dict[str, Any]:
    """AUTOMATIC1111's ``shared.state.dict()`` for the running job, plus ``queued`` (jobs waiting behind it)."""
    return {"skipped": job.skipped.is_set(), "interrupted": job.interrupted.is_set(), "stopping_generation": False,
            "job": job.id, "job_count": job.job_count, "job_timestamp": "0", "job_no": job.job_no,
            "sampling_step": job.sampling_step, "sampling_steps": job.sampling_steps, "queued": waiting}


def read_png_info(text: str, limits: Limits) -> dict[str, Any]:
    """``POST /sdapi/v1/png-info``: the ``parameters`` text, the other text chunks, and the parsed fields."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        image = Image.open(io.BytesIO(base64.b64decode(text.strip())))
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError):
        raise RequestError("image", "is not a base64-encoded image") from None
    limits.check_size("image", *image.size)
    info = image.info.get("parameters", "")
    items = {key: value for key, value in image.info.items() if isinstance(value, str) and key != "parameters"}
    parameters = read_a1111_parameters(info) if info else {}
    if "Size" in parameters and "x" in parameters["Size"]:
        parameters["Size-1"], _, parameters["Size-2"] = parameters["Size"].partition("x")
    return {"info": info, "items": items, "parameters": parameters}


# ---------------------------------------------------------------------- the page


def add_page_routes(app: FastAPI) -> None:
    static = resources.files("ldm.server") / "static"
    page = (static / "index.html").read_text(encoding="utf-8")
    files = {name: (static / name).read_bytes() for name in STATIC_FILES}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str):
        if name not in files:  # a fixed set: no path from the request reaches the file system
            return JSONResponse(status_code=404, content={"detail": "Not Found"})
        return Response(files[name], media_type=STATIC_FILES[name])
