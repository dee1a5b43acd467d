"""schemathesis hooks of `reliability.fuzz` (loaded by file path through SCHEMATHESIS_HOOKS): one
custom check, `error_body_names_the_problem`, applied to every response.

The contract it checks (docs/service.md, "Errors"): every 4xx is a JSON `ErrorResponse` with a
machine-readable `error` and a one-line `message`; a refused *input* (400, 401, 413, 415, 422)
also names the field in `errors[].field`, and the message starts with that field. Other 4xx
(404/405 of the router, 409 of a refused reload or a catalogue item) say what is wrong in the
message; there is no request field to blame.
"""

from __future__ import annotations

import json

import schemathesis

FIELD_STATUSES = frozenset({400, 401, 413, 415, 422})


def error_body_problem(status: int, content: bytes) -> str | None:
    """What is wrong with this 4xx answer's body (None: nothing, or not a 4xx)."""
    if not 400 <= status < 500:
        return None
    try:
        body = json.loads(content)
    except ValueError:
        return f"{status}: the body is not JSON: {content[:80]!r}"
    if not isinstance(body, dict):
        return f"{status}: the body is not a JSON object"
    if not isinstance(body.get("error"), str) or not body["error"]:
        return f"{status}: no 'error' kind"
    if not isinstance(body.get("message"), str) or not body["message"].strip():
        return f"{status}: no 'message'"
    if status in FIELD_STATUSES:
        errors = body.get("errors")
        if not isinstance(errors, list) or not errors:
            return f"{status}: no 'errors' naming the field"
        fields = [e.get("field") if isinstance(e, dict) else None for e in errors]
        if not all(isinstance(f, str) and f for f in fields):
            return f"{status}: an error without a field: {errors}"
        if not body["message"].startswith(fields[0]):
            return f"{status}: the message does not start with the field '{fields[0]}'"
    return None


@schemathesis.check
def error_body_names_the_problem(ctx, response, case):
    problem = error_body_problem(response.status_code, response.content)
    if problem is not None:
        raise AssertionError(problem)
    return None
