"""Official downloads, used when neither a source folder nor a mirror is given.

MovieLens-1M comes from GroupLens as `ml-1m.zip`, the posters one file per movie from the
`MovieImages/` folder of liangfgithub.github.io. Everything lands in a downloads folder
(`artifacts/downloads/` by default) in the same layout as the mirror (`ml-1m/`, `ml-1m-posters/`),
is written through a `.part` file renamed at the end, and is fetched only once: an HTTP 404 for an
image is recorded in `missing.txt` next to the images, as "no image"; any other failure is an error.
"""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

from mml.errors import DataError
from mml.progress import progress
from training.data.movielens import DATA_DIR, MOVIES, OFFICIAL_SHA256, POSTER_DIR, parse_movies

ML1M_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
POSTER_URL = "https://liangfgithub.github.io/MovieImages/{item_id}.jpg"
IMAGE_DIR = "images"  # downloads/images/: images of a generic-format source given as URLs
MISSING_LIST = "missing.txt"  # names whose URL answered HTTP 404
TIMEOUT_S = 60  # per request (connect and between bytes)
WORKERS = 8  # concurrent image downloads
CHUNK_BYTES = 1 << 16
HTTP_NOT_FOUND = 404


def download(url: str, dest: Path, on_bytes=None) -> bool:
    """Stream `url` into `dest`; False when the server answers 404, DataError on any other failure."""
    import requests

    part = dest.with_name(dest.name + ".part")
    try:
        with requests.get(url, stream=True, timeout=TIMEOUT_S) as response:
            if response.status_code == HTTP_NOT_FOUND:
                return False
            if response.status_code != 200:
                raise DataError(f"download failed: {url}: HTTP {response.status_code}")
            if on_bytes is not None:
                on_bytes(0, int(response.headers.get("content-length", 0)) or None)
            with part.open("wb") as handle:
                for block in response.iter_content(CHUNK_BYTES):
                    handle.write(block)
                    if on_bytes is not None:
                        on_bytes(len(block), None)
    except requests.RequestException as exc:
        part.unlink(missing_ok=True)
        raise DataError(f"download failed: {url}: {type(exc).__name__}: {exc}") from exc
    part.replace(dest)
    return True


def fetch_ml1m(downloads: Path, url: str = ML1M_URL) -> None:
    """Make `downloads/ml-1m/` hold the files of the official zip (downloaded once)."""
    data = downloads / DATA_DIR
    if all((data / name).is_file() for name in OFFICIAL_SHA256):
        return
    downloads.mkdir(parents=True, exist_ok=True)
    archive = downloads / "ml-1m.zip"
    if not archive.is_file():
        with progress() as bar:
            task = bar.add_task("ml-1m.zip", total=None, info=url)

            def on_bytes(n: int, total: int | None) -> None:
                if total:
                    bar.update(task, total=total)
                bar.advance(task, n)

            if not download(url, archive, on_bytes):
                raise DataError(f"download failed: {url}: HTTP 404")
    staging = downloads / f".{DATA_DIR}.extract"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = [f"{DATA_DIR}/{name}" for name in OFFICIAL_SHA256]
            absent = [member for member in members if member not in bundle.namelist()]
            if absent:
                raise DataError(f"{archive}: {absent[0]} is not in the archive")
            for member in members:
                bundle.extract(member, staging)
    except zipfile.BadZipFile as exc:
        archive.unlink()
        raise DataError(f"{archive} is not a valid zip file (removed; run again to re-download)") from exc
    shutil.rmtree(data, ignore_errors=True)
    (staging / DATA_DIR).replace(data)
    shutil.rmtree(staging, ignore_errors=True)


def fetch_images(urls: dict[str, str], folder: Path, description: str) -> None:
    """Download name -> url into folder/name, skipping names already there or recorded as 404."""
    folder.mkdir(parents=True, exist_ok=True)
    missing_list = folder / MISSING_LIST
    missing = set(missing_list.read_text().split()) if missing_list.is_file() else set()
    todo = {name: url for name, url in urls.items() if name not in missing and not (folder / name).is_file()}
    if not todo:
        return
    newly_missing: list[str] = []
    pool = ThreadPoolExecutor(WORKERS)
    try:
        with progress() as bar:
            task = bar.add_task(description, total=len(todo), info="")
            futures = {name: pool.submit(download, url, folder / name) for name, url in todo.items()}
            for name, future in futures.items():
                if not future.result():
                    newly_missing.append(name)
                bar.advance(task)
    finally:  # stop on the first failure, but keep the 404s seen so far
        pool.shutdown(cancel_futures=True)
        if newly_missing:
            missing_list.write_text("".join(f"{name}\n" for name in sorted(missing | set(newly_missing))))


def fetch_posters(downloads: Path, movies_path: Path, url: str = POSTER_URL) -> None:
    """One poster per movie of movies.dat into downloads/ml-1m-posters/."""
    item_ids = parse_movies(movies_path)["item_id"]
    urls = {f"{item_id}.jpg": url.format(item_id=item_id) for item_id in item_ids}
    fetch_images(urls, downloads / POSTER_DIR, "posters")


def fetch_ml1m_with_posters(downloads: Path) -> Path:
    """The official download in the mirror layout; returns the folder to read it from."""
    fetch_ml1m(downloads)
    fetch_posters(downloads, downloads / DATA_DIR / MOVIES)
    return downloads


def image_file_name(url: str) -> str:
    """A stable local file name for an image URL (hash of the URL + its extension)."""
    suffix = Path(urlparse(url).path).suffix.lower() or ".jpg"
    return hashlib.sha256(url.encode()).hexdigest()[:24] + suffix


def localise_images(images: list[str | None], downloads: Path) -> list[str | None]:
    """Replace http(s) URLs by the absolute path of their downloaded copy (None for a 404)."""
    urls = {
        image_file_name(image): image
        for image in images
        if image and image.startswith(("http://", "https://"))
    }
    if not urls:
        return images
    folder = downloads / IMAGE_DIR
    fetch_images(urls, folder, "images")
    local = {}
    for name, url in urls.items():
        local[url] = str((folder / name).resolve()) if (folder / name).is_file() else None
    return [local.get(image, image) if image else None for image in images]
