"""What the reliability scripts share beyond the dev harness (devtools/harness.py: redis-server,
`mml serve`, /proc sampling, timers): the test bundles, hard-linked bundle copies, the latency
proxy, a paced load generator that records every answer, and the results file. Loopback only;
every loop is bounded in time."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from devtools.bundles import sources_digest
from devtools.harness import ProcSample, RedisServer, Server, Timer, free_port, proc_sample, wait_port
from devtools.load import Answer, ThreadedLoad
from mml.errors import MMLError

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results" / "reliability.json"
DATA = REPO / ".cache" / "test-artifacts" / "ml-1m"  # the split + features the test suite builds too
BUNDLES = REPO / ".cache" / "test-artifacts" / "service-bundles"
WORK = REPO / ".cache" / "reliability"  # servers' logs, corrupted bundle copies (git-ignored)

__all__ = [
    "Answer",
    "ProcSample",
    "RedisServer",
    "Server",
    "Timer",
    "proc_sample",
]  # the dev harness's, re-exported


# --- test bundles ---------------------------------------------------------------------------------


def test_bundles() -> tuple[Path, Path]:
    """Two bundles (untrained MML over the ML-1M split, seeds 0 and 1), the same the service tests
    use (same cache directory and model versions, so whichever runs first builds them). Builds the
    split and features from MML_DATA_MIRROR when the cache has none."""
    from devtools.bundles import untrained_bundle

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


# --- the latency proxy ----------------------------------------------------------------------------


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
        wait_port(self.port, timeout, "the latency proxy")
        return self

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


# --- load: the dev harness's threaded generator with the reliability scripts' request mix ----------

CATALOGUE_IDS = [str(i) for i in range(1, 3953)]  # ML-1M's movie id range (a few are unknown: ignored)


@dataclass
class Mix:
    """Shares of the request kinds (the rest is POST /recall with a history in the body)."""

    stored_history: float = 0.15  # POST /recall without history: the user's stored events
    events: float = 0.05  # POST /events
    users: int = 500  # user ids drawn from a bounded pool: state in Redis stays bounded
    max_history: int = 20

    def __call__(self, rng: random.Random) -> tuple[str, str, dict]:
        user = f"u{rng.randrange(self.users)}"
        x = rng.random()
        if x < self.events:
            return "events", "/events", {"user_id": user, "item_id": rng.choice(CATALOGUE_IDS)}
        if x < self.events + self.stored_history:
            return "recall-stored", "/recall", {"user_id": user, "k": 20}
        history = rng.sample(CATALOGUE_IDS, rng.randint(1, self.max_history))
        return "recall", "/recall", {"user_id": user, "history": history, "k": 20}


def Load(  # noqa: N802 (reads as the class it builds)
    url: str, rate: float, duration_s: float, *, threads: int = 4, mix: Mix | None = None, seed: int = 0,
    timeout_s: float = 10.0,
) -> ThreadedLoad:  # fmt: skip
    """`threads` client threads sending `rate` requests/s of `mix` in total, for at most `duration_s`."""
    return ThreadedLoad(url, mix or Mix(), rate=rate, duration_s=duration_s, threads=threads, seed=seed,
                        timeout_s=timeout_s)  # fmt: skip


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
