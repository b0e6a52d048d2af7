"""JSON request bodies checked strictly against their declared type before Litestar converts them.

Litestar converts a handler's `data` with msgspec in its lenient mode, so `{"append_only": "false"}` becomes
`False`, `"7"` becomes `7` and `1000.0` becomes `1000`: a string could switch a project's append-only protection off,
and the documented types (the OpenAPI schema's `boolean`, `integer`) would not be the ones enforced. A controller
that takes JSON bodies sets `before_request = refuse_loose_json_bodies`: the body is decoded and converted strictly
first (a wrong type is a 422 naming the field, as every body error is), an empty or non-JSON body is a 400, and only
then does Litestar's own conversion run, on a body that it can no longer bend.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from litestar import Request
from litestar.exceptions import SerializationException, ValidationException

from zkeb.core.errors import ProblemError

__all__ = ("refuse_loose_json_bodies",)

#: msgspec names where an error is: "... - at `$.append_only`" (or `$[0]`, `$.a.b`).
_AT_PATH = re.compile(r" - at `\$\.?([^`]*)`$")


async def refuse_loose_json_bodies(request: Request[Any, Any, Any]) -> None:
    """Refuse a body that is empty, not JSON, or of the handler's `data` type only after lenient conversion.

    Raises:
        ProblemError: the body is empty or not JSON (400), or declared as another content type (415).
        ValidationException: a field has the wrong type or value, or is unknown (422 naming it).
    """
    data = request.route_handler.parsed_fn_signature.parameters.get("data")
    if data is None:
        return
    try:
        decoded = await request.json()  # the app's request class: 415 for another content type, 400 when unreadable
    except SerializationException:
        raise ProblemError("the request body is not valid JSON") from None
    if decoded is None:
        raise ProblemError("the request body is empty (or null): this operation takes a JSON object")
    try:
        msgspec.convert(decoded, data.annotation, strict=True)
    except msgspec.ValidationError as exc:
        message = str(exc)
        at = _AT_PATH.search(message)
        key = at.group(1) if at and at.group(1) else None
        raise ValidationException(
            "the request body is invalid",
            extra=[{"message": _AT_PATH.sub("", message), "key": key, "source": "body"}],
        ) from None
