"""The HTTP side of ``rqvae serve``: one page (HTML + vanilla JS + CSS, nothing from elsewhere) and a JSON
API. Model calls run off the event loop: generation jobs in the engine's worker threads, uploads and depth
views in Starlette's thread pool (torch releases the GIL).

    GET  /                                  the page
    GET  /api/info                          models, classes, limits
    POST /api/generate        JSON          -> {"job": id}; settings the model cannot honour -> 400
    GET  /api/jobs/{id}                     progress: done / total, the finished items so far
    POST /api/upload?name=F   image bytes   -> an item (codes + PSNR per depth); unreadable -> 400
    GET  /api/items/{id}                    label, codes, change (and PSNR) per depth
    GET  /api/items/{id}/image.png?depth=d  reconstruction from the first d codes (default all)
    GET  /api/items/{id}/heat.png?depth=d   |X^(d) - X^(d-1)| per pixel, colour-mapped
    GET  /api/items/{id}/original.png       an upload as the model sees it (resized, cropped)
    GET  /api/items/{id}/codes.safetensors  the codes, as `rqvae encode` writes them
"""

from __future__ import annotations

import json
from importlib import resources

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rqvae.errors import UserError
from rqvae.serve.engine import Engine, GenerateRequest
from rqvae.serve.store import Item
from rqvae.serve.views import png_bytes

STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "app.css": "text/css; charset=utf-8"}


def error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _static(name: str):
    body = resources.files("rqvae.serve").joinpath("static", name).read_bytes()

    async def endpoint(request: Request) -> Response:
        return Response(body, media_type=STATIC[name], headers={"Cache-Control": "no-cache"})
    return endpoint


async def read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None once it passes ``limit`` bytes (checked before reading when the client
    says its size)."""
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > limit:
        return None
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(engine: Engine, *, max_upload_mb: float = 10.0) -> Starlette:
    """The Starlette app over an :class:`Engine`."""
    limit = int(max_upload_mb * 1024 * 1024)

    async def info(request: Request) -> JSONResponse:
        return JSONResponse({**engine.info(), "max_upload_mb": max_upload_mb})

    async def generate(request: Request) -> JSONResponse:
        body = await read_body(request, 1 << 16)
        try:
            data = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError):
            return error("the request body must be a JSON object of generation settings")
        try:
            job = engine.submit(GenerateRequest.from_json(data))
        except UserError as e:
            return error(str(e))
        return JSONResponse({"job": job.id, "total": job.total})

    async def job_status(request: Request) -> JSONResponse:
        job = engine.store.job(request.path_params["job_id"])
        if job is None:
            return error("no such job (the server keeps the latest ones only); generate again", 404)
        return JSONResponse(job.status())

    async def upload(request: Request) -> JSONResponse:
        data = await read_body(request, limit)
        if data is None:
            return error(f"the file is larger than {max_upload_mb:g} MB, the limit of this server "
                         "(start it with --max-upload-mb N for more)", 413)
        try:
            item = await run_in_threadpool(engine.encode_upload, data, request.query_params.get("name", ""))
        except UserError as e:
            return error(str(e))
        return await item_json_for(item)

    def lookup(request: Request) -> Item:
        item = engine.store.item(request.path_params["item_id"])
        if item is None:
            raise UserError("no such image (the server keeps the latest ones only)")
        return item

    async def item_json_for(item: Item) -> JSONResponse:
        v = await run_in_threadpool(engine.views, item)
        return JSONResponse({"id": item.id, "label": item.label, "kind": item.kind,
                             "depth": item.codes.shape[-1], "codes": item.codes[0].tolist(),
                             "change": v.change, "psnr": v.psnr})

    async def item_json(request: Request) -> Response:
        return await item_json_for(lookup(request))

    def depth_of(request: Request, item: Item) -> int:
        D = item.codes.shape[-1]
        d = request.query_params.get("depth", str(D))
        if not d.isdigit() or not 1 <= int(d) <= D:
            raise UserError(f"depth must be 1..{D}, got {d!r}")
        return int(d)

    def depth_png(kind: str):
        async def endpoint(request: Request) -> Response:
            item = lookup(request)
            d = depth_of(request, item)
            v = await run_in_threadpool(engine.views, item)
            return Response(getattr(v, kind)[d - 1], media_type="image/png")
        return endpoint

    async def original(request: Request) -> Response:
        item = lookup(request)
        if item.original is None:
            raise UserError("this image was generated; only uploads have an original")
        return Response(await run_in_threadpool(png_bytes, item.original), media_type="image/png")

    async def codes(request: Request) -> Response:
        item = lookup(request)
        data = await run_in_threadpool(engine.codes_file, item)
        name = f"codes-{item.id}.safetensors"
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    async def user_error(request: Request, exc: Exception) -> JSONResponse:
        return error(str(exc), 404 if "no such" in str(exc) else 400)

    routes = [Route("/", _static("index.html")), Route("/static/app.js", _static("app.js")),
              Route("/static/app.css", _static("app.css")), Route("/api/info", info),
              Route("/api/generate", generate, methods=["POST"]), Route("/api/jobs/{job_id}", job_status),
              Route("/api/upload", upload, methods=["POST"]), Route("/api/items/{item_id}", item_json),
              Route("/api/items/{item_id}/image.png", depth_png("images")),
              Route("/api/items/{item_id}/heat.png", depth_png("heat")),
              Route("/api/items/{item_id}/original.png", original),
              Route("/api/items/{item_id}/codes.safetensors", codes)]
    return Starlette(routes=routes, exception_handlers={UserError: user_error})
