"""Test and benchmark helpers: a redis-server of one's own on a free port, the app under a real uvicorn
server in a thread (real HTTP over loopback). Not used by the service itself."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

SERVICE_ENV_PREFIXES = ("MML_", "REDIS_", "PROMETHEUS_")


def serve_process(
    bundle: Path, port: int, *args: str, env: dict[str, str] | None = None, **popen
) -> subprocess.Popen:
    """`mml serve --bundle BUNDLE --port PORT *ARGS` in a child process. Its environment is the
    caller's without service settings (MML_*, REDIS_*, PROMETHEUS_*: an in-process store, one arm,
    stdout exposures unless `env` says otherwise), plus `env`; `popen`: subprocess.Popen keywords."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(SERVICE_ENV_PREFIXES)}
    command = [sys.executable, "-m", "mml.cli", "serve", "--bundle", str(bundle), "--port", str(port), *args]
    return subprocess.Popen(command, env={**clean, **(env or {})}, **popen)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll URL/readyz until 200; RuntimeError if the process exits or the time runs out."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mml serve exited during start-up (code {proc.returncode})")
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as answer:
                if answer.status == 200:
                    return
        time.sleep(0.1)
    raise RuntimeError(f"mml serve did not become ready within {timeout:.0f} s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """redis-server on a free port with an RDB file in `directory`: stop() saves, start() reloads."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--save",
                "3600 1",
                "--appendonly",
                "no",
                "--loglevel",
                "warning",
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()  # SIGTERM: redis saves its RDB (a save point is configured), then exits
            self.process.wait(timeout=10)
            self.process = None


@contextlib.contextmanager
def redis_server(directory: Path):
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class ThreadedServer:
    """The app under a real uvicorn server in a background thread, on a free loopback port."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
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


# --- test bundles ---------------------------------------------------------------------------------

BUNDLE_SOURCES = ("model", "training/export", "mml/bundle.py", "mml/bundle_loader.py", "mml/neighbours.py")


def sources_digest(repo: Path) -> str:
    """A digest of the code that shapes a bundle: a cached test bundle is rebuilt when it changes."""
    import hashlib

    digest = hashlib.sha256()
    for rel in BUNDLE_SOURCES:
        path = repo / rel
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            digest.update(file.relative_to(repo).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def untrained_bundle(data_dir: Path, out: Path, seed: int, model_version: str) -> Path:
    """Export a randomly initialised MML over a prepared split + features (real item ids, features,
    encoders): a valid bundle in ~30 s, for tests of the serving machinery. Needs torch (the
    training extra); the service itself never imports this. Reused when `out` already holds it."""
    import json

    from mml.bundle import read_manifest

    if (out / "manifest.json").is_file() and read_manifest(out).model_version == model_version:
        return out
    import pandas as pd
    import torch

    from model.config import ModelConfig
    from model.mml import MML
    from training.export import export_model
    from training.export.tables import popularity_counts
    from training.features import load_features

    torch.manual_seed(seed)
    features = load_features(data_dir)
    stats = json.loads((data_dir / "stats.json").read_text())
    model = MML(ModelConfig(), stats["n_old_items"], features.text, features.image, features.image_mask)
    old = pd.read_parquet(data_dir / "old_interactions.parquet", columns=["item_idx"])["item_idx"].to_numpy()
    export_model(
        model,
        out,
        item_ids=features.item_id,
        popularity=popularity_counts([old], model.n_items),
        encoders_dir=data_dir / "encoders",
        model_version=model_version,
        overwrite=True,
        dataset={"name": "ml-1m", "untrained": True},
    )
    return out


def trained_bundle(run_dir: Path, data_dir: Path, out: Path) -> Path:
    """`mml export` of a finished training run to `out`, re-exported only when the run's final
    checkpoint or the export code changed. Needs torch."""
    import hashlib

    from mml.bundle import read_manifest
    from training.export import export_bundle

    final = Path(run_dir) / "stage3.pt"
    digest = hashlib.sha256(final.read_bytes()).hexdigest()[:10]
    version = f"trained-{digest}-{sources_digest(Path(__file__).resolve().parents[1])}"
    if (out / "manifest.json").is_file() and read_manifest(out).model_version == version:
        return out
    export_bundle(run_dir, out, data_dir, model_version=version, overwrite=True)
    return out
