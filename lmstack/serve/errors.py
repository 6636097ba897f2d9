"""OpenAI-style error responses.

Every failure the server reports has the body OpenAI's API uses, so the official clients raise
their usual exception types (`BadRequestError`, `AuthenticationError`, `NotFoundError`, ...):

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

Bad input is always a 4xx with a message naming the problem; a 500 means a bug in the server.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

# HTTP status -> the `type` OpenAI reports with it.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered with an OpenAI-style body and the given HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def _location(loc: tuple[Any, ...]) -> str:
    """('messages', 0, 'content') -> 'messages[0].content' (OpenAI's spelling of a parameter path)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def from_validation_error(exc: ValidationError) -> APIError:
    """The first problem pydantic found, worded as OpenAI words it."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    kind = first["type"]
    head, tags = _split_union(first["loc"])
    param = _location(head) or None
    if kind == "json_invalid":
        return bad_request(
            f"We could not parse the JSON body of your request ({first['msg']}). The body must be valid UTF-8 JSON; "
            "check for a missing quote or comma, or send the body with `Content-Type: application/json`.",
            code="invalid_json",
        )
    if kind == "model_type" and not head:
        return bad_request("The request body must be a JSON object.", code="invalid_json")
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param=param)
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if tags:  # a value matching none of a union's members: list what would have been accepted
        accepted = dict.fromkeys(t for e in errors for h, ts in [_split_union(e["loc"])] if h == head for t in ts[:1])
        return bad_request(
            f"Invalid type for '{param}': expected one of {', '.join(accepted)}.", param=param, code="invalid_type"
        )
    given = first.get("input")
    shown = repr(given) if isinstance(given, str | int | float | bool) or given is None else type(given).__name__
    return bad_request(f"Invalid value for '{param}': {first['msg']} (got {shown}).", param=param, code="invalid_value")


def _split_union(loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], list[str]]:
    """Split pydantic's location at the first union-member tag ('str', 'list[int]', 'NamedToolChoice').

    Field names here are snake_case, so a tag is recognised by brackets, quotes or a capital letter,
    or by being a bare type name. Returns (location before the tag, tags from there on).
    """
    for i, part in enumerate(loc):
        if isinstance(part, str) and (
            part in {"str", "int", "float", "bool"} or any(c in part for c in "[]'") or part[:1].isupper()
        ):
            return tuple(loc[:i]), [p for p in loc[i:] if isinstance(p, str)]
    return tuple(loc), []
