"""The workers of one `mml serve --workers N` replica, and how a reload reaches all of them.

Each uvicorn worker is its own process with its own loaded bundle, so a `POST /admin/reload` that
one worker receives cannot swap the others' in place. `mml serve` therefore gives the workers a
control folder (`MML_CONTROL_DIR`) that names what they serve:

    CONTROL/bundle      symlink to the default bundle (the workers' MML_BUNDLE; it links to the path
                        given, so `--bundle` may itself be a symlink that is switched before a SIGHUP)
    CONTROL/arms.json   written by the first per-arm reload: the arms config with that arm's new bundle
                        (absolute paths); from then on it is read instead of MML_ARMS_CONFIG

and the supervisor's pid (`MML_SUPERVISOR_PID`). A reload accepted by one worker (the new bundle
verified, loaded and warmed up there) is written into the control folder (each file replaced
atomically), then the worker sends SIGHUP to the supervisor, which replaces the workers one by one:
each new worker loads what the control folder names, and each old one is retired only once its
replacement is ready (uvicorn's restart; a replacement that fails to start leaves the old worker
serving). A single-process server has no control folder and swaps in place.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from service.ab import ArmsConfig

BUNDLE_LINK = "bundle"
ARMS_FILE = "arms.json"


@dataclass(frozen=True)
class WorkerGroup:
    control_dir: Path
    supervisor_pid: int
    workers: int

    @property
    def bundle_link(self) -> Path:
        return self.control_dir / BUNDLE_LINK

    @property
    def arms_file(self) -> Path:
        return self.control_dir / ARMS_FILE

    @classmethod
    def create(cls, control_dir: Path, bundle: Path, workers: int) -> WorkerGroup:
        """`mml serve` (the supervisor process): the control folder's first state."""
        group = cls(control_dir, os.getpid(), workers)
        group.publish(bundle)
        return group

    def environment(self) -> dict[str, str]:
        """What the workers read (service/config.py)."""
        return {
            "MML_BUNDLE": str(self.bundle_link),
            "MML_CONTROL_DIR": str(self.control_dir),
            "MML_SUPERVISOR_PID": str(self.supervisor_pid),
            "MML_WORKERS": str(self.workers),
        }

    def arms_override(self) -> Path | None:
        """The arms config a per-arm reload published, if any (it wins over MML_ARMS_CONFIG)."""
        return self.arms_file if self.arms_file.is_file() else None

    def publish(self, bundle: Path, arms: ArmsConfig | None = None) -> None:
        """Point the control folder at `bundle` (and `arms`, when given), each file replaced atomically.
        A default bundle that is the control link itself (a reload that kept it) is left alone."""
        if Path(os.path.abspath(bundle)) != Path(os.path.abspath(self.bundle_link)):
            tmp = self.control_dir / f".{BUNDLE_LINK}.{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(os.path.abspath(bundle))  # the path as given: a symlink stays one
            os.replace(tmp, self.bundle_link)
        if arms is None:
            return
        tmp = self.control_dir / f".{ARMS_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(arms.model_dump(mode="json"), indent=2) + "\n")
        os.replace(tmp, self.arms_file)

    def restart_workers(self) -> None:
        """Ask the supervisor to replace every worker (each loads the control folder's state)."""
        os.kill(self.supervisor_pid, signal.SIGHUP)


def worker_group(control_dir: Path | None, supervisor_pid: int | None, workers: int) -> WorkerGroup | None:
    """The group this worker belongs to, or None for a single-process server."""
    if control_dir is None or supervisor_pid is None:
        return None
    return WorkerGroup(Path(control_dir), supervisor_pid, workers)
