"""What every reliability script shares: the test bundles, a redis-server of our own, `mml serve` as a
real process, a paced load generator that records every answer, /proc sampling of a process, and
the results file. Loopback only; every loop is bounded in time."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from mml.errors import MMLError
from service.testing import free_port, sources_digest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results" / "reliability.json"
DATA = REPO / ".cache" / "test-artifacts" / "ml-1m"  # the split + features the test suite builds too
BUNDLES = REPO / ".cache" / "test-artifacts" / "service-bundles"
WORK = REPO / ".cache" / "reliability"  # servers' logs, corrupted bundle copies (git-ignored)

HOST = "127.0.0.1"
READY_TIMEOUT_S = 180.0  # loading a bundle takes seconds; a cold machine with two workers, more
STOP_TIMEOUT_S = 30.0  # graceful shutdown before SIGKILL


# --- test bundles ---------------------------------------------------------------------------------


def test_bundles() -> tuple[Path, Path]:
    """Two bundles (untrained MML over the ML-1M split, seeds 0 and 1), the same the service tests
    use (same cache directory and model versions, so whichever runs first builds them). Builds the
    split and features from MML_DATA_MIRROR when the cache has none."""
    from service.testing import untrained_bundle

    if not (DATA / "features.npz").is_file():
        mirror = os.environ.get("MML_DATA_MIRROR")
        if not mirror:
            raise MMLError(
                f"no prepared ML-1M split in {DATA}: set MML_DATA_MIRROR (the read-only mirror) "
                "or run the test suite once"
            )
        from training.data.prepare import prepare_dataset
        from training.features.encode import compute_features

        prepare_dataset(out=DATA, mirror=Path(mirror))
        compute_features(DATA)
    digest = sources_digest(REPO)
    a = untrained_bundle(DATA, BUNDLES / "a", seed=0, model_version=f"untrained-a-{digest}")
    b = untrained_bundle(DATA, BUNDLES / "b", seed=1, model_version=f"untrained-b-{digest}")
    return a, b


def model_version(bundle: Path) -> str:
    return json.loads((Path(bundle) / "manifest.json").read_text())["model_version"]


def linked_copy(src: Path, dst: Path) -> Path:
    """A copy of a bundle whose files are hard links (no 165 MB copy); files later corrupted must be
    replaced, not written in place (see `replace_file`)."""
    if dst.exists():
        shutil.rmtree(dst)
    for path in sorted(Path(src).rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:  # another file system
            shutil.copy2(path, target)
    return dst


def replace_file(path: Path, data: bytes) -> None:
    """Write `data` as a new file at `path` (breaks the hard link, leaves the original intact)."""
    path.unlink()
    path.write_bytes(data)


# --- redis-server of our own ------------------------------------------------------------------------


class RedisProcess:
    """redis-server on a free loopback port, no persistence (`--save "" --appendonly no`): a kill
    loses every key, as a crashed cache would."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise MMLError("redis-server is not installed (apt-get install redis-server)")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--loglevel",
                "warning",
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), timeout=0.2):
                return
            time.sleep(0.02)
        raise MMLError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, connections reset, state lost."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
            self.process = None

    def __enter__(self) -> RedisProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ProxyProcess:
    """reliability.latency_proxy in a process of its own (in the load generator's process it would
    share the GIL with the client threads and add latency of its own); `set_delay` changes the
    delay it adds to each direction while it runs."""

    def __init__(self, upstream_port: int, workdir: Path) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.delay_file = Path(workdir) / "proxy-delay-ms"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> ProxyProcess:
        self.delay_file.parent.mkdir(parents=True, exist_ok=True)
        self.delay_file.write_text("0")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "reliability.latency_proxy",
                "--upstream-port",
                str(self.upstream_port),
                "--port",
                str(self.port),
                "--delay-ms",
                "0",
                "--delay-file",
                str(self.delay_file),
                "--seconds",
                "3600",
            ],  # fmt: skip
            cwd=REPO,
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), timeout=0.2):
                return self
            time.sleep(0.02)
        raise MMLError("the latency proxy did not start")

    def set_delay(self, seconds: float) -> None:
        tmp = self.delay_file.with_suffix(".tmp")
        tmp.write_text(str(seconds * 1000))
        os.replace(tmp, self.delay_file)
        time.sleep(0.1)  # the proxy polls the file every 20 ms

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


# --- `mml serve` as a real process ----------------------------------------------------------------


class Server:
    """`mml serve` (uvicorn, its own process) on a free loopback port; stdout and stderr go to files
    in `workdir`, which is also its working directory."""

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
    ) -> None:
        self.bundle, self.workdir = Path(bundle), Path(workdir)
        self.token, self.redis_url, self.workers, self.log_level = token, redis_url, workers, log_level
        self.extra_env = env or {}
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.stdout_path = self.workdir / "server.stdout"
        self.stderr_path = self.workdir / "server.stderr"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MML_", "REDIS_", "PROMETHEUS_"))}
        env.update(self.extra_env)
        env.setdefault("MML_EXPOSURE_LOG", str(self.workdir / "exposures.jsonl"))
        if self.token is not None:
            env["MML_ADMIN_TOKEN"] = self.token  # the environment, never the command line
        args = [sys.executable, "-m", "mml.cli", "serve", "--bundle", str(self.bundle.absolute()),
                "--host", HOST, "--port", str(self.port), "--workers", str(self.workers),
                "--log-level", self.log_level]  # fmt: skip
        if self.redis_url:
            args += ["--redis-url", self.redis_url]
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(args, env=env, cwd=self.workdir, stdout=out, stderr=err)
        self.wait_ready()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise MMLError(f"mml serve exited with {self.process.returncode}: {self.stderr()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise MMLError(f"mml serve was not ready after {timeout:.0f} s")

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

    def stop(self) -> int | None:
        if self.process is None:
            return None
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout=10)
        self.process = None
        return code

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(p) for p in (task / "children").read_text().split()]
    return out


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


# --- load -----------------------------------------------------------------------------------------

CATALOGUE_IDS = [str(i) for i in range(1, 3953)]  # ML-1M's movie id range (a few are unknown: ignored)


@dataclass
class Answer:
    t: float  # seconds since the load started, when the request was sent
    route: str  # "recall", "recall-stored" (no history in the request), "events"
    status: int  # 0: no HTTP answer (connection refused / reset / timeout)
    latency_s: float
    degraded: bool = False
    fallback: bool = False
    model_version: str = ""
    error: str = ""


@dataclass
class Mix:
    """Shares of the request kinds (the rest is POST /recall with a history in the body)."""

    stored_history: float = 0.15  # POST /recall without history: the user's stored events
    events: float = 0.05  # POST /events
    users: int = 500  # user ids drawn from a bounded pool: state in Redis stays bounded
    max_history: int = 20


class Load:
    """`threads` client threads sending `rate` requests/s in total (each paced to its share; a
    thread behind schedule sends at once), for at most `duration_s`, or until stop()."""

    def __init__(
        self,
        url: str,
        rate: float,
        duration_s: float,
        *,
        threads: int = 4,
        mix: Mix | None = None,
        seed: int = 0,
        timeout_s: float = 10.0,
    ) -> None:
        self.url, self.rate, self.duration_s, self.timeout_s = url, rate, duration_s, timeout_s
        self.mix = mix or Mix()
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(random.Random(seed * 1000 + i), threads), daemon=True)
            for i in range(threads)
        ]
        self.start_time = 0.0

    def _request(self, rng: random.Random) -> tuple[str, str, dict]:
        m = self.mix
        user = f"u{rng.randrange(m.users)}"
        x = rng.random()
        if x < m.events:
            return "events", "/events", {"user_id": user, "item_id": rng.choice(CATALOGUE_IDS)}
        if x < m.events + m.stored_history:
            return "recall-stored", "/recall", {"user_id": user, "k": 20}
        history = rng.sample(CATALOGUE_IDS, rng.randint(1, m.max_history))
        return "recall", "/recall", {"user_id": user, "history": history, "k": 20}

    def _run(self, rng: random.Random, threads: int) -> None:
        interval = threads / self.rate
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
                route, path, body = self._request(rng)
                sent = time.monotonic()
                answer = Answer(sent - self.start_time, route, 0, 0.0)
                try:
                    r = client.post(path, json=body)
                    answer.status = r.status_code
                    if r.status_code == 200 and path == "/recall":
                        payload = r.json()
                        answer.degraded = payload["degraded"]
                        answer.fallback = payload["fallback"]
                        answer.model_version = payload["model_version"]
                    elif r.status_code >= 400:
                        answer.error = r.text[:300]
                except httpx.HTTPError as exc:
                    answer.error = repr(exc)[:300]
                answer.latency_s = time.monotonic() - sent
                with self._lock:
                    self.answers.append(answer)

    def start(self) -> Load:
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

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def is_failure(a: Answer) -> bool:
    """A request the service did not answer as its contract says: no answer, a 5xx (but 503 on
    POST /events while the store is down, which is the documented answer), any other non-2xx."""
    if a.route == "events":
        return a.status not in (202, 503)
    return a.status != 200


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summarise(answers: list[Answer]) -> dict:
    """Counts and latency percentiles (milliseconds, client side) of a list of answers."""
    recalls = [a for a in answers if a.route != "events"]
    lat = [a.latency_s * 1000 for a in recalls if a.status == 200]
    statuses: dict[str, int] = {}
    for a in answers:
        statuses[str(a.status)] = statuses.get(str(a.status), 0) + 1
    return {
        "requests": len(answers),
        "failed": sum(is_failure(a) for a in answers),
        "recall_degraded": sum(a.degraded for a in recalls),
        "recall_fallback": sum(a.fallback for a in recalls),
        "events_refused_503": sum(a.route == "events" and a.status == 503 for a in answers),
        "statuses": dict(sorted(statuses.items())),
        "recall_ms_p50": round(percentile(lat, 50), 2),
        "recall_ms_p99": round(percentile(lat, 99), 2),
        "recall_ms_max": round(max(lat), 2) if lat else None,
        "failure_examples": [asdict(a) for a in answers if is_failure(a)][:5],
    }


# --- results --------------------------------------------------------------------------------------


def machine() -> dict:
    """What else ran: the figures of a shared 2-core machine depend on it."""
    return {"cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)}


def update_results(path: Path, section: str, payload: dict) -> None:
    """Replace one section (fuzz, faults, soak, audit) of the results file, keeping the others."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[section] = json.loads(json.dumps(payload).replace(f"{REPO}/", ""))  # paths relative to the checkout
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@dataclass
class Timer:
    start: float = field(default_factory=time.monotonic)

    def __call__(self) -> float:
        return round(time.monotonic() - self.start, 3)
