"""Reliability and security checks of the recall service (docs/reliability.md).

    python -m reliability.fuzz     schemathesis over the OpenAPI spec of a running `mml serve`
    python -m reliability.faults   Redis killed / slowed, hot reloads, corrupted bundles, under load
    python -m reliability.soak     a steady rate for minutes: RSS and open fds per worker over time
    python -m reliability.audit    pip-audit of the installed dependencies, secrets in a fresh bundle

Every server, Redis and proxy these scripts start listens on 127.0.0.1 only, and every loop is
bounded in count and time. The figures go to docs/results/reliability.json (or --out).
"""
