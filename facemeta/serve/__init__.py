"""facemeta.serve: the HTTP API and web page over a FaceRecognizer and its gallery (`facemeta serve`).

    from facemeta.serve import FaceService, create_app
    service = FaceService("people", model_path="weights/default.safetensors")
    app = create_app(service, api_key=None, read_only=False)   # an ASGI app for uvicorn

Modules: ``service`` (the verbs over the recognizer: uploads, locking, inference slots), ``thumbnails``
(aligned-face JPEGs), ``guard`` (API key, upload cap, security headers, before any body is read),
``app`` (routes, error handlers, the static page).
"""

from facemeta.serve.app import create_app
from facemeta.serve.service import ApiError, FaceService

__all__ = ["ApiError", "FaceService", "create_app"]
