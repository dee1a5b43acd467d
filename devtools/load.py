"""The load generators (dev only), two ways of driving the service:

run_client(port, bodies, rate, seconds, connections)   latency: open-loop POST /recall over raw
    HTTP/1.1 keep-alive connections, in a process of its own; request i is due at t0 + i / rate
    whatever the earlier answers did (no coordinated omission); each answer's Server-Timing
    `app` entry is the server-side time. -> {sent, answered, errors, client_ms, server_ms, ...}
ThreadedLoad(url, requests, rate=None | r/s, ...)      behaviour: client threads in this process,
    paced to `rate` in total or back to back, every answer recorded (status, degraded, fallback,
    model version, body); for fault, soak and reload tests.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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


# --- threads in this process, every answer recorded ------------------------------------------------


@dataclass
class Answer:
    t: float  # seconds since the load started, when the request was sent
    route: str  # the request kind its source named ("recall", "recall-stored", "events", ...)
    status: int  # 0: no HTTP answer (connection refused / reset / timeout)
    latency_s: float
    degraded: bool = False
    fallback: bool = False
    model_version: str = ""
    error: str = ""
    body: dict = field(default_factory=dict)  # a 200 /recall answer


Requests = Callable[[random.Random], tuple[str, str, dict]]  # rng -> (route, path, JSON body)


def cycle(bodies: list[dict]) -> Requests:
    """POST /recall of these bodies, in turn (shared by the threads)."""
    counter = iter(range(10**12))
    return lambda rng: ("recall", "/recall", bodies[next(counter) % len(bodies)])


class ThreadedLoad:
    """`threads` client threads POSTing what `requests` gives, paced to `rate` requests/s in total (each
    thread to its share; behind schedule it sends at once) or back to back (rate None), for at most
    `duration_s`, or until stop()."""

    def __init__(
        self,
        url: str,
        requests: Requests,
        *,
        rate: float | None = None,
        duration_s: float = 3600.0,
        threads: int = 4,
        seed: int = 0,
        timeout_s: float = 10.0,
    ) -> None:
        self.url, self.requests, self.rate = url, requests, rate
        self.duration_s, self.timeout_s = duration_s, timeout_s
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(random.Random(seed * 1000 + i), threads), daemon=True)
            for i in range(threads)
        ]
        self.start_time = 0.0

    def _run(self, rng: random.Random, threads: int) -> None:
        import httpx

        interval = threads / self.rate if self.rate else 0.0
        next_at = time.monotonic() + rng.random() * interval
        end = self.start_time + self.duration_s
        with httpx.Client(base_url=self.url, timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= end:
                    return
                if next_at > now:
                    self._stop.wait(next_at - now)
                    continue
                next_at += interval
                route, path, body = self.requests(rng)
                sent = time.monotonic()
                answer = Answer(sent - self.start_time, route, 0, 0.0)
                try:
                    r = client.post(path, json=body)
                    answer.status = r.status_code
                    if r.status_code == 200 and path == "/recall":
                        answer.body = r.json()
                        answer.degraded = answer.body["degraded"]
                        answer.fallback = answer.body["fallback"]
                        answer.model_version = answer.body["model_version"]
                    elif r.status_code >= 400:
                        answer.error = r.text[:300]
                except httpx.HTTPError as exc:  # a dropped connection is a failure too
                    answer.error = repr(exc)[:300]
                answer.latency_s = time.monotonic() - sent
                with self._lock:
                    self.answers.append(answer)

    def start(self) -> ThreadedLoad:
        self.start_time = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def elapsed(self) -> float:
        return time.monotonic() - self.start_time

    def stop(self) -> list[Answer]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout_s + 5)
        return self.snapshot()

    def join(self) -> list[Answer]:
        for t in self._threads:
            t.join(timeout=self.duration_s + self.timeout_s + 5)
        return self.stop()

    def snapshot(self) -> list[Answer]:
        with self._lock:
            return sorted(self.answers, key=lambda a: a.t)

    def count(self) -> int:
        with self._lock:
            return len(self.answers)

    def wait_for(self, n: int, timeout: float = 60) -> None:
        """Until n more answers were recorded (AssertionError after `timeout` seconds)."""
        target = self.count() + n
        deadline = time.monotonic() + timeout
        while self.count() < target:
            assert time.monotonic() < deadline, "traffic stalled"
            time.sleep(0.01)

    def failures(self) -> list[Answer]:
        return [a for a in self.snapshot() if a.status != 200]

    def __enter__(self) -> ThreadedLoad:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
