"""Errors the routes turn into 4xx/5xx JSON answers (schemas.ErrorResponse)."""

from __future__ import annotations


class ApiError(Exception):
    """`detail` says what is wrong; with a `field`, the one-line message is "field: detail"."""

    def __init__(self, status: int, error: str, detail: str, field: str | None = None) -> None:
        self.status = status
        self.error = error
        self.detail = detail
        self.field = field
        self.message = f"{field}: {detail}" if field else detail
        super().__init__(self.message)


def invalid(field: str, detail: str, status: int = 422) -> ApiError:
    """A request field that fails a check the schema cannot express (deployment-dependent limits)."""
    return ApiError(status, "invalid_request", detail, field)
