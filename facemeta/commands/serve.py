"""`facemeta serve GALLERY`: the HTTP API and web page (verify, identify, enroll, manage people) over a gallery."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import stat

from facemeta.commands.options import (
    add_backend_options,
    add_runtime_options,
    backend_options,
    runtime_options,
)
from facemeta.errors import FacemetaError

MAX_UPLOAD_MB = 20
# facemeta.serve.budget's defaults, repeated so that --help needs no web framework (a test keeps them equal)
DEFAULT_MEGAPIXELS, BYTES_PER_PIXEL = 80, 45


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `serve` and its options."""
    p = subparsers.add_parser(
        "serve", help="serve a gallery over HTTP: a JSON API and a web page",
        description="Load the model once and serve GALLERY over HTTP (FastAPI + uvicorn): POST /api/verify, "
                    "/api/identify, /api/enroll; GET /api/people, /api/info, /api/health; PATCH and DELETE "
                    "/api/people/NAME. The web page is at /, the OpenAPI docs at /docs. Binds 127.0.0.1 unless "
                    "--host says otherwise; give --api-key-file before exposing it to a network. "
                    "Needs the 'serve' extra: pip install 'facemeta[serve]'.")
    p.add_argument("gallery", metavar="GALLERY", help="gallery folder (created by the first enroll)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--model", help="model checkpoint (.safetensors); default: the model in weights/ or $FACEMETA_MODEL")
    add_backend_options(p)
    add_runtime_options(p)
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--api-key-file", metavar="F",
                   help="file holding the API key: every route but /api/health and the page then needs it "
                        "(X-API-Key: KEY or Authorization: Bearer KEY)")
    p.add_argument("--read-only", action="store_true", help="refuse enroll, rename and remove (403)")
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB,
                   help=f"largest request body in MB, all its photos together (default {MAX_UPLOAD_MB})")
    p.add_argument("--max-megapixels-in-flight", type=float, default=DEFAULT_MEGAPIXELS, metavar="MP",
                   help=f"memory bound: megapixels that all requests together may be decoding at once (default "
                        f"{DEFAULT_MEGAPIXELS}, two photos at the 40 MP cap of each; about {BYTES_PER_PIXEL} bytes "
                        "of memory per pixel while an image is decoded and searched for faces, so the default "
                        f"holds about {DEFAULT_MEGAPIXELS * BYTES_PER_PIXEL / 1000:.1f} GB); requests beyond it "
                        "wait, and get 503 after two minutes")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per request (default: half the cores); requests that may run the model "
                        "at once: cores // threads")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def read_api_key(path: str) -> str:
    """The key in a file (surrounding whitespace stripped); a one-line error when missing, empty or short."""
    try:
        with open(path, encoding="utf-8") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            key = fh.read(4096).strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise FacemetaError(f"cannot read --api-key-file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not key or any(c.isspace() for c in key) or not key.isprintable():
        raise FacemetaError(f"--api-key-file {path} must hold one key: printable characters, no spaces")
    if len(key) < 16:
        raise FacemetaError(f"the API key in {path} is {len(key)} characters; use at least 16 "
                            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logging.getLogger("facemeta.serve").warning("%s is readable by other users; chmod 600 it", path)
    return key


def is_loopback(host: str) -> bool:
    """Whether an address to bind is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted (exit 0); 1 with a one-line error for a bad option, model or gallery."""
    try:
        import uvicorn

        from facemeta.serve import FaceService, create_app
        from facemeta.serve.protocol import json_errors_protocol
    except ImportError as exc:
        raise FacemetaError(f"`facemeta serve` needs {exc.name}: pip install 'facemeta[serve]'") from None

    if not 1 <= args.port <= 65535:
        raise FacemetaError(f"--port must be in 1..65535, got {args.port}")
    if not args.max_upload_mb > 0:
        raise FacemetaError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    if args.threads is not None and args.threads < 1:
        raise FacemetaError(f"--threads must be >= 1, got {args.threads}")
    key = read_api_key(args.api_key_file) if args.api_key_file else None
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s:     %(name)s: %(message)s")
    log = logging.getLogger("facemeta.serve")
    log.setLevel(args.log_level.upper())
    from facemeta.serve.service import default_threads

    if not args.max_megapixels_in_flight > 0:
        raise FacemetaError(f"--max-megapixels-in-flight must be > 0, got {args.max_megapixels_in_flight}")
    service = FaceService(args.gallery, args.model, device=args.device, read_only=args.read_only,
                          threads=args.threads or default_threads(), **backend_options(args),
                          **runtime_options(args),
                          max_pixels_in_flight=max(1, int(args.max_megapixels_in_flight * 1_000_000)))
    loopback = is_loopback(args.host)
    if not loopback and key is None:
        log.warning("serving on %s without an API key: anyone who can reach this port can see and change the "
                    "gallery (use --api-key-file)", args.host)
    allowed = ["127.0.0.1", "localhost", "::1"] if loopback else None
    app = create_app(service, api_key=key, max_upload_bytes=int(args.max_upload_mb * 2**20), allowed_hosts=allowed)
    log.info("model %s (%s), gallery %s, %d torch thread(s) x %d inference slot(s)%s%s",
             service.embedder.model_path.name, service.embedder.fingerprint, args.gallery, service.threads,
             service.slots, ", read-only" if args.read_only else "", ", API key required" if key else "")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, workers=1,
                    server_header=False, proxy_headers=False, http=json_errors_protocol())
    finally:
        service.close()
    return 0

