"""The workers of one `mml serve --workers N` replica, and how a reload reaches all of them.

Each uvicorn worker is its own process with its own loaded bundle, so a `POST /admin/reload` that
one worker receives cannot swap the others' in place. `mml serve` therefore gives the workers a
control folder (`MML_CONTROL_DIR`):

    CONTROL/bundle       symlink to the default bundle (the workers' MML_BUNDLE; it links to the path
                         given, so `--bundle` may itself be a symlink that is switched before a SIGHUP)
    CONTROL/arms.json    written by the first per-arm reload: the arms config with that arm's new
                         bundle (absolute paths); from then on it is read instead of MML_ARMS_CONFIG
    CONTROL/reload.json  the last reload: {generation, origin (pid), path, arm}

The worker that receives a reload verifies, loads and warms up the new bundle and swaps it in (as a
single process does), then publishes it: the bundle link and the arms file first (what a worker
started later loads), then reload.json, each file replaced atomically. Every other worker polls
reload.json (`POLL_S`) and makes the same reload in place, in a thread, while it keeps answering:
no worker is restarted, so no connection is dropped. A worker that cannot load the bundle keeps its
old one and logs it (`mml_bundle_reloads_total{result="refused"}`); `GET /readyz` (with the pid) or
`/v1/models` on each worker shows what it serves.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from service.ab import ArmsConfig

log = logging.getLogger("mml.service")

BUNDLE_LINK = "bundle"
ARMS_FILE = "arms.json"
RELOAD_FILE = "reload.json"
POLL_S = 0.5  # how often a worker looks for a reload published by another worker


@dataclass(frozen=True)
class Published:
    """A reload one worker made, for the others to make too."""

    generation: int
    origin: int  # pid of the worker that made it
    path: str | None
    arm: str | None


@dataclass(frozen=True)
class WorkerGroup:
    control_dir: Path
    workers: int

    @property
    def bundle_link(self) -> Path:
        return self.control_dir / BUNDLE_LINK

    @property
    def arms_file(self) -> Path:
        return self.control_dir / ARMS_FILE

    @property
    def reload_file(self) -> Path:
        return self.control_dir / RELOAD_FILE

    @classmethod
    def create(cls, control_dir: Path, bundle: Path, workers: int) -> WorkerGroup:
        """`mml serve` (the supervisor process): the control folder's first state."""
        group = cls(control_dir, workers)
        group._link(bundle)
        return group

    def environment(self) -> dict[str, str]:
        """What the workers read (service/config.py)."""
        return {
            "MML_BUNDLE": str(self.bundle_link),
            "MML_CONTROL_DIR": str(self.control_dir),
            "MML_WORKERS": str(self.workers),
        }

    def arms_override(self) -> Path | None:
        """The arms config a per-arm reload published, if any (it wins over MML_ARMS_CONFIG)."""
        return self.arms_file if self.arms_file.is_file() else None

    def publish(self, bundle: Path, arms: ArmsConfig | None, path: str | None, arm: str | None) -> Published:
        """After a reload to `bundle` (the new default bundle) with `arms` (given for a per-arm reload):
        the state a worker started later loads, then the record the running workers follow."""
        self._link(bundle)
        if arms is not None:
            self._write(self.arms_file, json.dumps(arms.model_dump(mode="json"), indent=2))
        last = self.last()
        generation = max(time.time_ns(), (last.generation + 1) if last else 0)
        record = Published(generation, os.getpid(), path, arm)
        self._write(self.reload_file, json.dumps(record.__dict__))
        return record

    def last(self) -> Published | None:
        """The last published reload (None before the first one, or if the file is unreadable)."""
        try:
            return Published(**json.loads(self.reload_file.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.error("unreadable %s: %s", self.reload_file, exc)
            return None

    def _link(self, bundle: Path) -> None:
        """Point the bundle link at `bundle`, unless `bundle` is the link itself (a reload that kept
        the default bundle)."""
        target = os.path.abspath(bundle)
        if Path(target) == Path(os.path.abspath(self.bundle_link)):
            return
        tmp = self.control_dir / f".{BUNDLE_LINK}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)  # the path as given: a symlink stays one
        os.replace(tmp, self.bundle_link)

    def _write(self, path: Path, text: str) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text + "\n")
        os.replace(tmp, path)


def worker_group(control_dir: Path | None, workers: int) -> WorkerGroup | None:
    """The group this worker belongs to, or None for a single-process server."""
    return None if control_dir is None else WorkerGroup(Path(control_dir), workers)
