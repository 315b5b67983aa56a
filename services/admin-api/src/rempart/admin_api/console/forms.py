"""Reading an HTML form post: ``application/x-www-form-urlencoded`` parsed by the standard
library, within the API's body limit (the app-wide middleware stops a larger body first)."""

from __future__ import annotations

from urllib.parse import parse_qsl

from fastapi import Request

from rempart.admin_api.backend import ProblemError

FORM_TYPE = "application/x-www-form-urlencoded"
MAX_FIELDS = 400  # the settings page's largest group has about 40 fields


class Form:
    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._pairs = pairs

    def get(self, name: str, default: str = "") -> str:
        for key, value in self._pairs:
            if key == name:
                return value
        return default

    def getlist(self, name: str) -> list[str]:
        return [value for key, value in self._pairs if key == name]

    def has(self, name: str) -> bool:
        return any(key == name for key, _ in self._pairs)


async def read_form(request: Request) -> Form:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != FORM_TYPE:
        raise ProblemError(415, f"Forms are sent as {FORM_TYPE}")
    body = await request.body()
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise ProblemError(400, "The form could not be read") from None
    return Form(pairs)
