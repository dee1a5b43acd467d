"""What the service serves and how that changes: load, reload, publish/follow (several workers), and
the background sync of registered new items. Requests only read `Lifecycle.deployment`.

A `Deployment` is immutable: the arms config, the assigner, one `ArmRoute` (stage chain) per arm,
and per distinct bundle one `ServingSnapshot` (service/snapshot.py). Every change builds a new
deployment and swaps one reference, so a request that read it finishes on a consistent state:

* reload (`POST /admin/reload`, SIGHUP, or following another worker): verify, load and warm up the
  new bundle(s) in the caller's thread, then swap; a refused bundle leaves the old deployment;
* item sync (`mml-item-sync` thread, every `MML_ITEM_SYNC_S`): one registry read (`items:version`,
  one round trip); when registrations changed, the new items' embeddings are generated (Faiss
  neighbours + generator.onnx, item_tower.onnx) and new snapshots swapped in. `PUT /items` runs the
  same sync at once on the worker that received it;
* follow (`mml-follow` thread, several workers): the reloads another worker published in the
  control folder (service/workers.py) are made here too.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from mml.errors import MMLError
from service import metrics
from service.ab import ArmsConfig, Assigner, load_arms
from service.config import ServiceSettings
from service.errors import ApiError, invalid
from service.items import ItemRegistry
from service.recall import ArmRoute, mml_chain, mml_cooc_chain, popularity_chain
from service.runtime import Runtime
from service.snapshot import BundleState, ServingSnapshot
from service.store import Store
from service.topk import TopKConfig
from service.workers import POLL_S, worker_group

log = logging.getLogger("mml.service")


@dataclass(frozen=True)
class Deployment:
    config: ArmsConfig
    default_bundle: Path
    assigner: Assigner
    arms: dict[str, ArmRoute]
    bundles: dict[Path, BundleState]  # bundle path -> what builds its snapshots (shared by its arms)
    snapshots: dict[Path, ServingSnapshot]  # bundle path -> what requests read

    def runtime(self, arm: str) -> Runtime:
        return self.snapshots[self.arms[arm].bundle].runtime


def _abs(path: str | Path) -> Path:
    """Absolute and normalised, symlinks NOT resolved: a reload re-reads what a symlink points to now."""
    return Path(os.path.abspath(path))


def build_deployment(
    config: ArmsConfig,
    default_bundle: Path,
    registry: ItemRegistry,
    store: Store,
    reuse: dict[Path, BundleState] | None = None,
    topk: TopKConfig | None = None,
) -> Deployment:
    """Load (or reuse) each distinct bundle once, sync its registered items, chain every arm."""
    reuse = reuse or {}
    topk = topk or TopKConfig()
    bundles: dict[Path, BundleState] = {}
    arms: dict[str, ArmRoute] = {}
    for arm in config.arms:
        path = _abs(arm.bundle or default_bundle)  # not resolved: a symlink is followed on reload
        if path not in bundles:
            state = reuse.get(path)
            bundles[path] = state if state is not None else BundleState(Runtime.load(path), registry, topk)
        runtime = bundles[path].runtime
        if arm.kind == "popularity":
            version, chain = f"popularity@{runtime.model_version}", popularity_chain(store)
        elif arm.kind == "mml_cooc":
            if not runtime.has_cooc:  # refused at start-up, and by a reload (409, the old bundle stays)
                raise MMLError(
                    f"arm '{arm.name}': kind mml_cooc needs a bundle with the co-occurrence learner "
                    f"(graph recall_cooc and tables/cooc.npz); {path} ({runtime.model_version}) has "
                    "neither: export a model trained with model.cooc_neighbours > 0, or use kind mml"
                )
            version, chain = runtime.model_version, mml_cooc_chain(store)
        elif arm.adapt_steps > 0:
            try:
                from service.adapt import AdaptingModel  # torch: only for arms that ask for it
            except ModuleNotFoundError as exc:
                raise MMLError(
                    f"arm '{arm.name}': adapt_steps > 0 needs torch (pip install 'mml-recall[training]'): {exc}"
                ) from exc
            model = AdaptingModel(runtime, arm.adapt_steps)
            version, chain = model.model_version, mml_chain(store, model)
        else:
            version, chain = runtime.model_version, mml_chain(store)
        arms[arm.name] = ArmRoute(arm.name, arm.kind, path, version, arm.adapt_steps, chain)
    snapshots = {path: state.next_snapshot(None) for path, state in bundles.items()}
    return Deployment(config, _abs(default_bundle), Assigner(config), arms, bundles, snapshots)


class Lifecycle:
    def __init__(self, settings: ServiceSettings, store: Store, registry: ItemRegistry) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.deployment: Deployment | None = None
        self.group = worker_group(settings.control_dir, settings.workers)
        self._reload_lock = threading.Lock()  # one reload at a time
        self._swap_lock = threading.Lock()  # reload and item sync swap one at a time
        self._followed = 0  # generation of the last reload published by the group and made here
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- start and stop ---------------------------------------------------------------------------

    def load(self) -> None:
        if self.settings.bundle is None:
            raise MMLError("no bundle to serve: set MML_BUNDLE or pass --bundle")
        arms_file = None
        if self.group is not None:  # what the group serves now (a worker may start after reloads)
            arms_file = self.group.arms_override()
            last = self.group.last()
            self._followed = last.generation if last else 0
        config = load_arms(arms_file or self.settings.arms_config)
        new = build_deployment(
            config, self.settings.bundle, self.registry, self.store, topk=self.settings.topk
        )
        with self._swap_lock:
            self._swap(new)

    def start(self) -> None:
        """The background threads: item sync, and following the group's reloads (several workers)."""
        self._spawn("mml-item-sync", self.settings.item_sync_s, self.sync_items)
        if self.group is not None:
            self._spawn("mml-follow", POLL_S, self._follow_if_pending)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def _spawn(self, name: str, period: float, work) -> None:
        def loop() -> None:
            while not self._stop.wait(period):
                try:
                    work()
                except Exception:  # logged each round; the thread must outlive a bad round
                    log.exception("%s failed", name)

        thread = threading.Thread(target=loop, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _swap(self, new: Deployment) -> None:
        """Swap lock held."""
        old = self.deployment
        self.deployment = new  # one reference assignment: atomic for every reader
        for name, arm in new.arms.items():
            previous = old.arms[name].model_version if old and name in old.arms else None
            metrics.set_bundle(name, arm.model_version, previous)

    # --- registered new items ---------------------------------------------------------------------

    def sync_items(self) -> bool:
        """Bring every bundle's snapshot up to date with the registry; True when one changed."""
        with self._swap_lock:
            current = self.deployment
            if current is None:
                return False
            snapshots = {p: state.next_snapshot(current.snapshots[p]) for p, state in current.bundles.items()}
            if all(snapshots[p] is current.snapshots[p] for p in snapshots):
                return False
            self._swap(dataclasses.replace(current, snapshots=snapshots))
            return True

    # --- reload -----------------------------------------------------------------------------------

    def reload(self, path: str | None = None, arm: str | None = None, publish: bool = True) -> dict[str, str]:
        """Build a new deployment (new bundle for the default arms, or for `arm`), then swap it in;
        with several workers, publish it for the others (`publish=False`: following one of theirs).
        Raises ApiError 409 when a reload is already running or the new bundle is refused."""
        if not self._reload_lock.acquire(blocking=False):
            raise ApiError(409, "reload_in_progress", "another reload is in progress")
        try:
            current = self.deployment
            if current is None:
                raise ApiError(503, "not_ready", "the service has not loaded its bundle yet")
            config = current.config.model_copy(deep=True)
            default = current.default_bundle
            if arm is not None:
                if arm not in current.arms:
                    raise invalid("arm", f"unknown arm '{arm}' (arms: {', '.join(current.arms)})")
                target = next(a for a in config.arms if a.name == arm)
                target.bundle = _abs(path) if path else current.arms[arm].bundle
                rebuilt = {target.bundle}
            else:
                default = _abs(path) if path else default
                rebuilt = {default}
            # Bundles not named by this reload keep their loaded runtime; the named one is rebuilt.
            reuse = {p: s for p, s in current.bundles.items() if p not in rebuilt}
            try:
                new = build_deployment(config, default, self.registry, self.store, reuse, self.settings.topk)
            except MMLError as exc:
                metrics.RELOADS.labels(result="refused").inc()
                raise ApiError(
                    409, "bundle_refused", f"bundle refused, still serving the old one: {exc}"
                ) from exc
            with self._swap_lock:
                self._swap(new)
            metrics.RELOADS.labels(result="ok").inc()
            served = {name: a.model_version for name, a in new.arms.items()}
            log.info("reloaded: %s", served)
            if self.group is not None and publish:
                self._publish(new, path, arm)
            return served
        finally:
            self._reload_lock.release()

    def _publish(self, new: Deployment, path: str | None, arm: str | None) -> None:
        """Tell the other workers (service/workers.py)."""
        try:
            record = self.group.publish(
                new.default_bundle,
                new.config if arm is not None else None,
                str(_abs(path)) if path else None,
                arm,
            )
        except OSError as exc:
            log.error("reload not published to the other workers: %s", exc)
            raise ApiError(
                503, "reload_not_published",
                f"this worker serves the new bundle, the other workers could not be told ({exc}); retry",
            ) from exc  # fmt: skip
        self._followed = record.generation
        log.info("reload published in %s for the other workers", self.group.control_dir)

    def follow_published(self) -> bool:
        """Make the last reload another worker published, if not made here yet. True when there was
        one to make (done, or refused by this worker: it keeps its bundle and logs why); False when
        there was none, or a reload of this worker is running (retried at the next poll)."""
        last = self.group.last() if self.group is not None else None
        if last is None or last.generation <= self._followed:
            return False
        if last.origin != os.getpid():
            try:
                served = self.reload(last.path, last.arm, publish=False)
                log.info("followed the reload of worker %d: %s", last.origin, served)
            except ApiError as exc:
                if exc.error == "reload_in_progress":
                    return False
                log.error("could not follow the reload of worker %d: %s", last.origin, exc.message)
        self._followed = last.generation
        return True

    def pending_publication(self) -> bool:
        """A reload published by the group and not made here yet (cheap: one small file read)."""
        last = self.group.last() if self.group is not None else None
        return last is not None and last.generation > self._followed

    def _follow_if_pending(self) -> None:
        if self.pending_publication():
            self.follow_published()
