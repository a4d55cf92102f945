"""uvicorn's HTTP protocol with its own error answers in the API's shape.

A request too malformed to reach the app (a broken request line, bad header bytes, a bad chunked body) is
answered by uvicorn itself, as plain text; every other answer of the service is a one-line JSON
``{"error": ...}``. :func:`json_errors_protocol` returns uvicorn's protocol class (the one it would pick
itself: httptools when installed, else h11) with that answer replaced by the JSON one, for
``uvicorn.run(..., http=...)``.
"""

from __future__ import annotations

import json


def json_400(message: str) -> bytes:
    """The whole HTTP answer to a request that could not be parsed: 400, a one-line JSON error, closed."""
    body = json.dumps({"error": f"malformed HTTP request: {message.strip().rstrip('.')}"},
                      separators=(",", ":")).encode()
    head = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nx-content-type-options: nosniff\r\nconnection: close\r\n\r\n")
    return head + body


def json_errors_protocol() -> type:
    """uvicorn's automatic HTTP protocol class, answering unparseable requests with :func:`json_400`."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class JsonErrorsProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        """uvicorn's protocol; its own 400 answers are JSON."""

        def send_400_response(self, msg: str) -> None:
            self.transport.write(json_400(msg))
            self.transport.close()

    return JsonErrorsProtocol
