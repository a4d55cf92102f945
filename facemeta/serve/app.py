"""The FastAPI app of `facemeta serve`: JSON routes under /api, the web page at /, OpenAPI docs at /docs.

Routes are plain ``def`` functions, so FastAPI runs them in its thread pool: reads run in parallel
(FaceService bounds the inference), writes queue on the service's write lock. Every expected refusal
is a one-line JSON ``{"error": ...}`` with a 4xx status; anything unexpected is logged and answered
with a 500 one-liner, and the server goes on serving.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, File, Form, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from facemeta.errors import FacemetaError, one_line
from facemeta.serve.domain_routes import add_domain_routes
from facemeta.serve.guard import Guard
from facemeta.serve.service import MAX_TOP_K, ApiError, FaceService, status_for
from facemeta.version import __version__

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_UPLOAD = 20 * 2**20
log = logging.getLogger("facemeta.serve")


class Rename(BaseModel):
    """PATCH /api/people/{name}: the new name."""

    name: str = Field(description="the new name")


class RenameByBody(BaseModel):
    """POST /api/rename: a person's name and their new name."""

    name: str = Field(description="the person's current name")
    new_name: str = Field(description="the new name")


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_line(exc: RequestValidationError) -> str:
    """FastAPI's validation errors as one line: 'images: Field required; top_k: ...'."""
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "form"))
        parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
    return one_line("; ".join(parts) or "invalid request")


def create_app(service: FaceService, api_key: str | None = None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
               allowed_hosts: list[str] | None = None) -> FastAPI:
    """The ASGI app over a FaceService. api_key: required on every route but health, the page and the
    docs. max_upload_bytes: cap of a request body. allowed_hosts: Host names served (None: any)."""
    key_doc = [Depends(APIKeyHeader(name="X-API-Key", auto_error=False))] if api_key else []  # Swagger's Authorize
    app = FastAPI(title="facemeta", version=__version__,
                  description="Face verification (1:1), identification (1:N) and a gallery of people over one "
                              "face model. Images are multipart uploads; every error is a one-line JSON "
                              "`{\"error\": ...}`." + (" Send the API key as `X-API-Key`." if api_key else ""))
    app.state.service = service

    _add_error_handlers(app)

    # ------------------------------------------------------------------ reads
    @app.get("/api/health", tags=["server"])
    def health() -> dict:
        """Liveness: no API key needed."""
        return {"status": "ok", "version": __version__}

    @app.get("/api/info", tags=["server"], dependencies=key_doc)
    def info() -> dict:
        """The model (fingerprint, embedding size, threshold and its FAR), the gallery's size, server settings."""
        out = service.info()
        out["server"].update(auth=api_key is not None, max_upload_bytes=max_upload_bytes)
        return out

    @app.post("/api/verify", tags=["faces"], dependencies=key_doc)
    def verify(a: Annotated[UploadFile, File(description="first photo")],
               b: Annotated[UploadFile, File(description="second photo")],
               threshold: Annotated[float | None, Form(description="decision threshold (default: the model's)")] = None,
               domain_a: Annotated[str | None, Form(description="the domain photo a comes from")] = None,
               domain_b: Annotated[str | None, Form(description="the domain photo b comes from")] = None,
               ) -> dict:
        """Same person in two photos? score, threshold (and FAR), decision, and the two aligned faces."""
        return service.verify((a.filename, a.file), (b.filename, b.file), threshold=threshold,
                              domain_a=domain_a or None, domain_b=domain_b or None)

    @app.post("/api/identify", tags=["faces"], dependencies=key_doc)
    def identify(image: Annotated[UploadFile, File(description="a photo")],
                 top_k: Annotated[int, Form(ge=1, le=MAX_TOP_K, description="candidates per face")] = 3,
                 threshold: Annotated[float | None, Form(description="open-set threshold (default: the gallery's)")] = None,
                 preview: Annotated[bool, Form(description="also return the image as a JPEG (max 640 px)")] = False,
                 domain: Annotated[str | None, Form(description="the domain the photo comes from")] = None,
                 ) -> dict:
        """Every face in a photo: box (in the image's pixels), name or "unknown", score, candidates; the
        threshold and its FAR; the image's size (and a preview JPEG if asked)."""
        return service.identify((image.filename, image.file), top_k=top_k, threshold=threshold, preview=preview,
                                domain=domain or None)

    @app.get("/api/people", tags=["gallery"], dependencies=key_doc)
    def people() -> dict:
        """Every enrolled person: name, id, number of photos, thumbnail URL."""
        return service.people()

    @app.get("/api/thumbnails/{identity_id}", tags=["gallery"], dependencies=key_doc,
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    def thumbnail(identity_id: int) -> Response:
        """The aligned face of a person's first enrolled photo (JPEG)."""
        return Response(service.thumbnail(identity_id), media_type="image/jpeg",
                        headers={"cache-control": "private, max-age=60"})

    _add_write_routes(app, service, key_doc)
    add_domain_routes(app, service, key_doc)

    # ------------------------------------------------------------------ the page
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Guard, api_key=api_key, max_body=max_upload_bytes, allowed_hosts=allowed_hosts)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as a one-line JSON {"error": ...} with its status; anything unexpected a logged 500."""
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, one_line(exc.message, 400))

    @app.exception_handler(FacemetaError)
    async def facemeta_error(_: Request, exc: FacemetaError) -> JSONResponse:
        return _error(status_for(exc), one_line(exc, 400))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_line(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, one_line(str(exc.detail), 400), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the details")


def _add_write_routes(app: FastAPI, service: FaceService, key_doc: list) -> None:
    """Enroll, rename and remove (refused with 403 on a read-only server)."""
    @app.post("/api/enroll", tags=["gallery"], dependencies=key_doc, status_code=201)
    def enroll(response: Response, name: Annotated[str, Form(description="the person's name")],
               images: Annotated[list[UploadFile], File(description="one or more photos of that person")],
               force: Annotated[bool, Form(description="add photos even if already enrolled")] = False,
               domain: Annotated[str | None, Form(description="the domain the photos come from")] = None) -> dict:
        """Add a person's photos (one face each): 201 when something was added, 200 when every photo was
        already enrolled; unusable photos are listed in `skipped` with the reason."""
        out = service.enroll(name, [(f.filename, f.file) for f in images], force=force, domain=domain or None)
        if not out["added"]:
            response.status_code = 200
        return out

    @app.patch("/api/people/{name:path}", tags=["gallery"], dependencies=key_doc)
    def rename(name: str, body: Rename) -> dict:
        """Rename a person (JSON body {"name": NEW})."""
        return service.rename(name, body.name)

    @app.post("/api/rename", tags=["gallery"], dependencies=key_doc)
    def rename_by_body(body: RenameByBody) -> dict:
        """Rename a person (JSON body {"name": OLD, "new_name": NEW}); the same as PATCH /api/people/{name}."""
        return service.rename(body.name, body.new_name)

    @app.delete("/api/people/{name:path}", tags=["gallery"], dependencies=key_doc)
    def remove(name: str) -> dict:
        """Remove a person, every embedding of theirs and their thumbnail."""
        return service.remove(name)
