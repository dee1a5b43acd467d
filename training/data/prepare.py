"""`mml data prepare`: find the input, split it, write the prepared folder atomically, cache it.

Input, first match wins:
  source  a folder in the ML-1M layout (ml-1m/ + ml-1m-posters/) or in the generic format
          (interactions.* + items.*); a non-official ML-1M-layout dataset only warns.
  mirror  `mirror=` / --mirror, else the MML_DATA_MIRROR environment variable: a local copy of the
          official release in the ML-1M layout; every file must match its official sha256.
  else    the official download into `downloads` (artifacts/downloads/), checked the same way.

The output folder (docs/architecture.md section 2) is written into a temporary sibling and renamed
into place at the end, so an interrupted run leaves no half-written folder and a rerun replaces the
old one whole. meta.json stores a hash of the inputs and options: a rerun with the same ones
returns the stored stats without redoing any work.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from mml.errors import DataError
from training.data import movielens
from training.data.coldstart import ML1M_T, ColdStartSplit, SplitOptions, make_split, parse_time
from training.data.generic import find_table, is_generic_folder

FORMAT_VERSION = 1  # bump when the prepared folder's content changes for the same inputs
MIRROR_ENV = "MML_DATA_MIRROR"
DEFAULT_DOWNLOADS = Path("artifacts") / "downloads"
SPLIT_FILES = ("items.parquet", "old_interactions.parquet", "new_users.parquet", "stats.json")
META_FILE = "meta.json"


@dataclass
class Inputs:
    """Where the data comes from, and what identifies its content."""

    kind: str  # "source" | "mirror" | "download"
    layout: str  # "ml-1m" | "generic"
    root: Path
    official: bool  # the official MovieLens-1M files, verified by sha256
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    images: str = ""  # fingerprint of the poster folder listing (names and sizes)

    def describe(self) -> str:
        what = "MovieLens-1M (official)" if self.official else f"{self.layout} dataset"
        return f"{what} from {self.kind} {self.root}"


def _listing_fingerprint(folder: Path) -> str:
    if not folder.is_dir():
        return "absent"
    entries = sorted((entry.name, entry.stat().st_size) for entry in os.scandir(folder) if entry.is_file())
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _ml1m_inputs(kind: str, root: Path) -> Inputs:
    official_required = kind != "source"
    if official_required and not (root / movielens.POSTER_DIR).is_dir():
        raise DataError(f"{kind} {root}: missing folder {movielens.POSTER_DIR}/ (the posters)")
    files, official = movielens.check_files(root, official_required)
    return Inputs(kind, "ml-1m", root, official, files, _listing_fingerprint(root / movielens.POSTER_DIR))


def resolve_inputs(source: Path | None, mirror: Path | None, downloads: Path) -> Inputs:
    if source is not None and mirror is not None:
        raise DataError("give either a source folder or a mirror, not both")
    if source is not None:
        root = Path(source).resolve()
        if not root.is_dir():
            raise DataError(f"source {source} is not a folder")
        if movielens.is_ml1m_folder(root):
            return _ml1m_inputs("source", root)
        if is_generic_folder(root):
            tables = [find_table(root, "interactions"), find_table(root, "items")]
            files = {path.name: movielens.file_sha256(path) for path in tables if path is not None}
            return Inputs("source", "generic", root, False, files)
        raise DataError(
            f"source {root}: neither the ML-1M layout (ml-1m/ratings.dat, ml-1m/movies.dat) nor the "
            "generic format (interactions.csv|parquet + items.csv|parquet)"
        )
    if mirror is None and os.environ.get(MIRROR_ENV):
        mirror = Path(os.environ[MIRROR_ENV])
    if mirror is not None:
        root = Path(mirror).resolve()
        if not (root / movielens.DATA_DIR).is_dir():
            raise DataError(f"mirror {mirror}: missing folder {movielens.DATA_DIR}/")
        return _ml1m_inputs("mirror", root)
    from training.data.download import fetch_ml1m_with_posters

    return _ml1m_inputs("download", fetch_ml1m_with_posters(Path(downloads)).resolve())


def _options(T: int | str | None, inputs: Inputs, cold_items: float, seed: int, support: int) -> SplitOptions:
    if T is None:
        if not inputs.official:
            raise DataError(f"T is required for {inputs.describe()} (the default T is for MovieLens-1M)")
        T = ML1M_T
    try:
        return SplitOptions(T=parse_time(T), cold_items=cold_items, seed=seed, support=support)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise DataError(f"{error['loc'][0]}: {error['msg']} (got {error.get('input')!r})") from exc


def _input_hash(inputs: Inputs, options: SplitOptions, downloads: Path) -> str:
    key = {
        "format_version": FORMAT_VERSION,
        "layout": inputs.layout,
        "root": str(inputs.root),  # image paths are absolute paths under it
        "files": inputs.files,
        "images": inputs.images,
        "downloads": str(Path(downloads).resolve()) if inputs.layout == "generic" else "",
        "options": options.model_dump(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def cached_stats(out: Path, input_hash: str) -> dict | None:
    """The stored stats when `out` is a complete split made from the same inputs and options."""
    try:
        meta = json.loads((out / META_FILE).read_text())
        if meta.get("input_hash") != input_hash or not all((out / name).is_file() for name in SPLIT_FILES):
            return None
        return json.loads((out / "stats.json").read_text())
    except (OSError, ValueError):
        return None


def write_split(folder: Path, split: ColdStartSplit) -> None:
    split.items.to_parquet(folder / "items.parquet", index=False)
    split.old_interactions.to_parquet(folder / "old_interactions.parquet", index=False)
    split.new_users.to_parquet(folder / "new_users.parquet", index=False)
    (folder / "stats.json").write_text(json.dumps(split.stats, indent=2) + "\n")


def write_meta(folder: Path, meta: dict) -> None:
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _publish(staging: Path, out: Path) -> None:
    """Move the finished staging folder to `out`, replacing an older split whole."""
    if not out.exists():
        staging.rename(out)
        return
    retired = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
    out.rename(retired)
    try:
        staging.rename(out)
    except OSError:
        retired.rename(out)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _check_replaceable(out: Path) -> None:
    """Never replace a folder that is not a prepared split (it could hold anything)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / META_FILE).is_file():
        raise DataError(f"out {out} exists, is not empty and is not a prepared split: refusing to replace it")


def prepare_dataset(
    out: Path,
    source: Path | None = None,
    mirror: Path | None = None,
    T: int | str | None = None,
    cold_items: float = 0.0,
    seed: int = 2020,
    support: int = 8,
    downloads: Path = DEFAULT_DOWNLOADS,
    verbose: bool = True,
) -> dict:
    """Prepare the cold-start split into `out` (or reuse it); returns its stats (stats.json)."""
    out = Path(out)
    inputs = resolve_inputs(source, mirror, downloads)
    options = _options(T, inputs, cold_items, seed, support)
    input_hash = _input_hash(inputs, options, downloads)
    stats = cached_stats(out, input_hash)
    if stats is not None:
        if verbose:
            print_stats(stats, note=f"up to date: {out}")
        return stats
    _check_replaceable(out)

    if inputs.layout == "ml-1m":
        tables = movielens.read_ml1m(inputs.root)
    else:
        from training.data.download import localise_images
        from training.data.generic import read_generic

        tables = read_generic(inputs.root)
        tables.items["image"] = localise_images(list(tables.items["image"]), Path(downloads))
    split = make_split(tables, options)
    split.stats["source"] = inputs.describe()
    split.stats["dataset"] = "ml-1m" if inputs.official else inputs.root.name
    meta = {
        "format_version": FORMAT_VERSION,
        "input_hash": input_hash,
        "source": {
            "kind": inputs.kind,
            "layout": inputs.layout,
            "path": str(inputs.root),
            "official": inputs.official,
        },
        "files_sha256": inputs.files,
        "images": inputs.images,
        "options": options.model_dump(),
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        staging.mkdir()
        write_split(staging, split)
        write_meta(staging, meta)  # last: its presence marks a complete split
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if verbose:
        print_stats(split.stats, note=f"written: {out}")
    return split.stats


def stats_table(stats: dict):
    """A rich table in the style of the paper's Table 1."""
    from rich.table import Table

    table = Table(
        title=f"{stats.get('dataset', '')} cold-start split, T = {stats['T_iso']}", caption_justify="left"
    )
    for name in ("split", "#users", "#items", "#interactions", "#inter/user"):
        table.add_column(name, justify="left" if name == "split" else "right")
    rows = [
        ("old (D_old, <= T)", stats["n_old_users"], stats["n_old_items"], stats["n_old_interactions"]),
        ("new users (> T)", stats["n_new_users"], stats["n_new_user_items"], stats["n_new_interactions"]),
    ]
    for name, users, items, interactions in rows:
        table.add_row(name, f"{users:,}", f"{items:,}", f"{interactions:,}", f"{interactions / users:.4f}")
    table.add_row("catalogue", "", f"{stats['n_items']:,}", "", "")
    table.caption = (
        f"{stats['n_new_items']:,} new items ({stats['n_cold_items']:,} made new by cold_items="
        f"{stats['cold_items']}); {stats['n_items_with_image']:,} items with an image; new users: "
        f"{stats['support']} support + 1 valid + 1 query, {stats['n_new_users_dropped']:,} dropped as too short"
    )
    return table


def print_stats(stats: dict, note: str = "") -> None:
    from mml.progress import console

    console.print(stats_table(stats))
    if note:
        console.print(note)
