"""The dev harness (not shipped: `pip install .` leaves this package out): the one copy of the
launchers, readiness wait, process sampling and timers that tests/, `mml bench` (devtools/
bench_service.py), loadtest/ and reliability/ use. Loopback only; every wait is bounded.

    free_port()                       a free loopback TCP port
    RedisServer(dir | None)           redis-server of one's own: persistent RDB in `dir`, or none
    serve_process(bundle, port, ...)  `mml serve` as a child process, a clean service environment
    wait_ready(url, proc)             poll /readyz until 200 (seconds waited)
    Server(bundle, workdir, ...)      serve_process + wait_ready + logs + graceful stop
    ThreadedServer(app)               the app under uvicorn in a thread (real HTTP, one process)
    process_tree / cpu_seconds / rss_bytes / proc_sample / stop_process
    Timer                             seconds since it was made
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
SERVICE_ENV_PREFIXES = ("MML_", "REDIS_", "PROMETHEUS_")
READY_TIMEOUT_S = 180.0  # loading a bundle takes seconds; a cold machine with two workers, more
STOP_TIMEOUT_S = 30.0  # graceful shutdown before SIGKILL


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not start on port {port}")


# --- redis-server of one's own --------------------------------------------------------------------


class RedisServer:
    """redis-server on a free loopback port. With `directory`, an RDB file there: stop() saves and
    start() reloads it; without, no persistence: a kill loses every key, as a crashed cache would."""

    def __init__(self, directory: Path | None = None, port: int | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.port = port or free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        persistence = ["--dir", str(self.directory), "--save", "3600 1"] if self.directory else ["--save", ""]
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", HOST, *persistence, "--appendonly", "no",
             "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        wait_port(self.port, timeout, "redis-server")
        return self

    def stop(self) -> None:
        """SIGTERM: redis saves its RDB when it has a save point, then exits."""
        if self.process is not None:
            stop_process(self.process, 10)
            self.process = None

    def kill(self) -> None:
        """SIGKILL: no shutdown, connections reset, state lost."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def redis_server(directory: Path | None = None):
    with RedisServer(directory) as server:
        yield server


# --- `mml serve` ------------------------------------------------------------------------------------


def serve_process(
    bundle: Path, port: int, *args: str, env: dict[str, str] | None = None, **popen
) -> subprocess.Popen:
    """`mml serve --bundle BUNDLE --port PORT *ARGS` in a child process. Its environment is the
    caller's without service settings (MML_*, REDIS_*, PROMETHEUS_*: an in-process store, one arm,
    stdout exposures unless `env` says otherwise), plus `env`; `popen`: subprocess.Popen keywords."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(SERVICE_ENV_PREFIXES)}
    command = [sys.executable, "-m", "mml.cli", "serve", "--bundle", str(bundle), "--port", str(port), *args]
    return subprocess.Popen(command, env={**clean, **(env or {})}, **popen)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = READY_TIMEOUT_S) -> float:
    """Poll URL/readyz until 200; the seconds it took. RuntimeError if the process exits or the
    time runs out."""
    import urllib.error
    import urllib.request

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"mml serve exited during start-up (code {proc.returncode})")
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as answer:
                if answer.status == 200:
                    return time.monotonic() - start
        time.sleep(0.1)
    raise RuntimeError(f"mml serve did not become ready within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen | None, grace: float = STOP_TIMEOUT_S) -> int | None:
    """SIGTERM (uvicorn drains in-flight requests), SIGKILL after `grace` seconds; the exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


class Server:
    """`mml serve` on a free loopback port; stdout and stderr go to files in `workdir`, which is
    also its working directory (exposures there too unless `env` names another log)."""

    def __init__(
        self,
        bundle: Path,
        workdir: Path,
        *,
        token: str | None = None,
        redis_url: str | None = None,
        workers: int = 1,
        log_level: str = "warning",
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        cwd: Path | None = None,
    ) -> None:
        self.bundle, self.workdir = Path(bundle), Path(workdir)
        self.token, self.redis_url, self.workers, self.log_level = token, redis_url, workers, log_level
        self.extra_env, self.args, self.cwd = env or {}, args, cwd
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.stdout_path = self.workdir / "server.stdout"
        self.stderr_path = self.workdir / "server.stderr"
        self.process: subprocess.Popen | None = None
        self.ready_seconds = 0.0

    def start(self, timeout: float = READY_TIMEOUT_S) -> Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {"MML_EXPOSURE_LOG": str(self.workdir / "exposures.jsonl"), **self.extra_env}
        if self.token is not None:
            env["MML_ADMIN_TOKEN"] = self.token  # the environment, never the command line
        args = ["--host", HOST, "--workers", str(self.workers), "--log-level", self.log_level, *self.args]
        if self.redis_url:
            args += ["--redis-url", self.redis_url]
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = serve_process(
                self.bundle.absolute(),
                self.port,
                *args,
                env=env,
                cwd=self.cwd or self.workdir,
                stdout=out,
                stderr=err,
            )
        try:
            self.ready_seconds = wait_ready(self.url, self.process, timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {self.stderr()[-2000:]}") from exc
        return self

    def worker_pids(self) -> list[int]:
        """The processes that answer requests: the server itself with one worker, else its
        children that are uvicorn workers (multiprocessing's resource tracker left out)."""
        if self.workers == 1:
            return [self.process.pid]
        pids = []
        for pid in children(self.process.pid):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"resource_tracker" not in cmdline:
                pids.append(pid)
        return pids

    def stop(self, grace: float = STOP_TIMEOUT_S) -> int | None:
        code = stop_process(self.process, grace)
        self.process = None
        return code

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ThreadedServer:
    """The app under a real uvicorn server in a background thread, on a free loopback port."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        config = uvicorn.Config(app, host=HOST, port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server failed to start (see the log above)")
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start in time")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


# --- processes ------------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    out = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(p) for p in (task / "children").read_text().split()]
    return out


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (the uvicorn workers of `mml serve --workers N`)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


@dataclass
class ProcSample:
    t: float  # seconds since the sampler started
    pid: int
    rss_bytes: int
    open_fds: int


def proc_sample(pid: int, t: float = 0.0) -> ProcSample:
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return ProcSample(t, pid, rss, len(os.listdir(f"/proc/{pid}/fd")))


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its descendants (VmRSS), bytes."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += proc_sample(p).rss_bytes
    return total


@dataclass
class Timer:
    start: float = field(default_factory=time.monotonic)

    def __call__(self) -> float:
        return round(time.monotonic() - self.start, 3)
