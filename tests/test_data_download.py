"""Downloads against a real HTTP server on localhost (this machine has no internet access)."""

from __future__ import annotations

import socket
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_data_movielens import ratings_for, write_ml1m

from mml.errors import DataError
from training.data.download import MISSING_LIST, fetch_images, fetch_ml1m, fetch_posters, localise_images
from training.data.prepare import prepare_dataset


class Handler(SimpleHTTPRequestHandler):
    """Serves a folder; any path containing 'boom' answers HTTP 500."""

    def do_GET(self) -> None:
        if "boom" in self.path:
            self.send_error(500)
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()


def test_fetch_images_records_404_and_is_incremental(tmp_path: Path, server: tuple[str, Path]) -> None:
    url, www = server
    (www / "1.jpg").write_bytes(b"one")
    (www / "2.jpg").write_bytes(b"two")
    dest = tmp_path / "posters"
    names = {name: f"{url}/{name}" for name in ("1.jpg", "2.jpg", "3.jpg")}
    fetch_images(names, dest, "posters")
    assert (dest / "1.jpg").read_bytes() == b"one" and (dest / "2.jpg").read_bytes() == b"two"
    assert not (dest / "3.jpg").exists()
    assert (dest / MISSING_LIST).read_text().split() == ["3.jpg"]
    assert not list(dest.glob("*.part"))
    (www / "1.jpg").write_bytes(b"changed")  # a rerun fetches nothing: present or known missing
    fetch_images(names, dest, "posters")
    assert (dest / "1.jpg").read_bytes() == b"one"


def test_other_http_errors_fail_clearly(tmp_path: Path, server: tuple[str, Path]) -> None:
    url, _ = server
    with pytest.raises(DataError, match=r"download failed: .*/boom.jpg: HTTP 500"):
        fetch_images({"x.jpg": f"{url}/boom.jpg"}, tmp_path / "images", "images")
    assert not (tmp_path / "images" / MISSING_LIST).exists()


def test_unreachable_server_fails_clearly(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DataError, match="download failed: .*ConnectionError"):
        fetch_images({"x.jpg": f"http://127.0.0.1:{port}/x.jpg"}, tmp_path, "images")


def test_fetch_ml1m_and_posters(tmp_path: Path, server: tuple[str, Path]) -> None:
    url, www = server
    original = write_ml1m(tmp_path / "original", ratings_for())
    with zipfile.ZipFile(www / "ml-1m.zip", "w") as archive:
        for name in ("ratings.dat", "movies.dat", "users.dat", "README"):
            if (original / "ml-1m" / name).exists():
                archive.write(original / "ml-1m" / name, f"ml-1m/{name}")
    (www / "MovieImages").mkdir()
    (www / "MovieImages" / "1.jpg").write_bytes(b"poster one")

    downloads = tmp_path / "downloads"
    fetch_ml1m(downloads, url=f"{url}/ml-1m.zip")
    for name in ("ratings.dat", "movies.dat", "users.dat"):
        assert (downloads / "ml-1m" / name).read_bytes() == (original / "ml-1m" / name).read_bytes()
    fetch_posters(downloads, downloads / "ml-1m" / "movies.dat", url=f"{url}/MovieImages/{{item_id}}.jpg")
    assert (downloads / "ml-1m-posters" / "1.jpg").read_bytes() == b"poster one"
    assert (downloads / "ml-1m-posters" / MISSING_LIST).read_text().split() == [
        "2.jpg",
        "3.jpg",
        "4.jpg",
        "5.jpg",
    ]


def test_bad_zip_is_removed(tmp_path: Path, server: tuple[str, Path]) -> None:
    url, www = server
    (www / "ml-1m.zip").write_bytes(b"<html>not a zip</html>")
    with pytest.raises(DataError, match="not a valid zip file"):
        fetch_ml1m(tmp_path, url=f"{url}/ml-1m.zip")
    assert not (tmp_path / "ml-1m.zip").exists()
    with pytest.raises(DataError, match="HTTP 404"):
        fetch_ml1m(tmp_path, url=f"{url}/absent.zip")


def test_localise_images(tmp_path: Path, server: tuple[str, Path]) -> None:
    url, www = server
    (www / "a.png").write_bytes(b"png")
    images = [f"{url}/a.png", None, "/abs/local.jpg", f"{url}/gone.jpg"]
    local = localise_images(images, tmp_path)
    assert Path(local[0]).read_bytes() == b"png" and local[0].endswith(".png")
    assert local[1:] == [None, "/abs/local.jpg", None]


def test_the_download_is_checked_like_a_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without source or mirror, prepare uses the downloads folder (already filled here, so no
    network) and refuses files that are not the official release."""
    monkeypatch.delenv("MML_DATA_MIRROR", raising=False)
    downloads = write_ml1m(tmp_path / "downloads", ratings_for())
    (downloads / "ml-1m-posters" / MISSING_LIST).write_text("4.jpg\n5.jpg\n")
    with pytest.raises(DataError, match="ratings.dat: sha256 .* does not match the official"):
        prepare_dataset(tmp_path / "out", downloads=downloads, verbose=False)
