"""The load generator (dev only): open-loop POST /recall traffic over raw HTTP/1.1 keep-alive
connections, in a process of its own. Request i is due at t0 + i / rate whatever the earlier answers
did, so a slow server cannot slow the load down (no coordinated omission); each answer's
`Server-Timing` `app` entry is the server-side time.

    run_client(port, bodies, rate, seconds, connections) -> {sent, answered, errors, client_ms, server_ms, ...}
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONNECTIONS = 64  # keep-alive connections (requests in flight at most)


async def _load(port: int, bodies: list[bytes], rate: float, seconds: float, connections: int) -> dict:
    n = int(rate * seconds)
    client_ms = np.full(n, np.nan)
    server_ms = np.full(n, np.nan)
    statuses = np.zeros(n, np.int32)
    counter = iter(range(n))
    t0 = time.perf_counter() + 0.05

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in counter:
                due = t0 + i / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                body = bodies[i % len(bodies)]
                writer.write(
                    b"POST /recall HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                statuses[i] = int(lines[0].split()[1])
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    name = name.lower()
                    if name == "content-length":
                        length = int(value)
                    elif name == "server-timing":
                        for entry in value.split(","):
                            key, _, dur = entry.strip().partition(";dur=")
                            if key == "app":
                                server_ms[i] = float(dur)
                await reader.readexactly(length)
                client_ms[i] = (time.perf_counter() - due) * 1000
        finally:
            writer.close()

    start = time.perf_counter()
    results = await asyncio.gather(*(connection() for _ in range(connections)), return_exceptions=True)
    elapsed = time.perf_counter() - start
    failures = [r for r in results if isinstance(r, BaseException)]
    done = ~np.isnan(client_ms)
    return {
        "sent": n,
        "answered": int(done.sum()),
        "errors": int((statuses[done] != 200).sum()) + (n - int(done.sum())),
        "connection_failures": len(failures),
        "seconds": elapsed,
        "client_ms": client_ms[done].tolist(),
        "server_ms": server_ms[done & ~np.isnan(server_ms)].tolist(),
    }


def _client_main() -> None:
    """Entry of the load-generator process: JSON job on stdin, JSON results on stdout."""
    job = json.loads(sys.stdin.read())
    bodies = [b.encode() for b in job["bodies"]]
    out = asyncio.run(_load(job["port"], bodies, job["rate"], job["seconds"], job["connections"]))
    sys.stdout.write(json.dumps(out))


def run_client(
    port: int, bodies: list[str], rate: float, seconds: float, connections: int = CONNECTIONS
) -> dict:
    """`bodies` (JSON texts, cycled) to POST /recall on 127.0.0.1:port at `rate` per second for
    `seconds`, from a child process; its figures."""
    job = json.dumps(
        {"port": port, "bodies": bodies, "rate": rate, "seconds": seconds, "connections": connections}
    )
    proc = subprocess.run(
        [sys.executable, "-c", "from devtools.load import _client_main; _client_main()"],
        input=job,
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)
