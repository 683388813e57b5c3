"""OpenAI-style error bodies for every HTTP answer that is not a success.

``{"error": {"message", "type", "param", "code"}}`` as vLLM's OpenAI server writes them: ``type``
names the error as the OpenAI SDK's exception class for that status (``BadRequestError``,
``NotFoundError``, ...) and ``code`` is the HTTP status.  Every failure -- our own
:class:`APIError`, Werkzeug's HTTP exceptions (unknown route, body too large or too slow) and
anything unexpected -- is answered this way; a traceback goes to the log, never to the client.
"""

from __future__ import annotations

import logging

from quart import Quart, Response, json, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger("jax_realtime.server")

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    409: "ConflictError",
    413: "BadRequestError",
    415: "BadRequestError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
    504: "TimeoutError",
}

BAD_AUDIO = "Invalid or unsupported audio file."


class APIError(Exception):
    """An error answered as ``status`` with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, *, type_: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_ or ERROR_TYPES.get(status, "APIError")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}

    def response(self) -> Response:
        response = Response(json.dumps(self.body()), status=self.status, mimetype="application/json")
        response.headers.update(self.headers)
        return response


def too_large(limit_bytes: int) -> APIError:
    return APIError(400, f"Maximum file size exceeded: the request is over this server's limit of "
                         f"{limit_bytes / (1024 * 1024):g} MiB.", "file")


def field_too_large(limit_bytes: int) -> APIError:
    from jax_realtime.tokenizer import MAX_PROMPT_CHARS

    return APIError(400, f"A form field is over this server's limit of {limit_bytes // 1024} KiB (a prompt may hold "
                         f"at most {MAX_PROMPT_CHARS} characters).", None)


def _body_over_the_cap(limit_bytes: int) -> bool:
    """Whether a 413 was for the body (declared or received past MAX_CONTENT_LENGTH), not for one
    form field over MAX_FORM_MEMORY_SIZE."""
    received = getattr(getattr(request, "body", None), "_received", 0) or 0
    return (request.content_length or 0) > limit_bytes or received > limit_bytes


def install_error_handlers(app: Quart) -> None:
    @app.errorhandler(APIError)
    async def api_error(error: APIError):
        return error.response()

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException):
        status = error.code or 500
        if status == 413:  # a bad request, as the spec (and vLLM) answer it
            if not _body_over_the_cap(app.config["MAX_CONTENT_LENGTH"]):
                return field_too_large(app.config["MAX_FORM_MEMORY_SIZE"]).response()
            return too_large(app.config["MAX_CONTENT_LENGTH"]).response()
        if status == 408:
            message = f"The request body did not arrive within {app.config['BODY_TIMEOUT']:g} s."
        elif status == 404:
            message = "Not found."
        elif status == 405:
            message = "Method not allowed."
        else:
            message = error.description or error.name
        response = APIError(status, message).response()
        if status == 405 and getattr(error, "valid_methods", None):
            response.headers["Allow"] = ", ".join(error.valid_methods)
        return response

    @app.errorhandler(Exception)
    async def unexpected(error: Exception):
        log.exception("unexpected error while answering a request")
        return APIError(500, "Internal server error.").response()
