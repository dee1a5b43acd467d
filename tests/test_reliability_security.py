"""The service's hardened surface, against a real `mml serve` process on loopback (its stdout and
stderr captured, exposure records on stdout):

* admin routes refuse a missing, wrong, truncated, extended or wrongly-schemed token (401 naming
  `Authorization`), and the token is compared with hmac.compare_digest (read from the code);
* body caps: 413 by Content-Length, by a chunked body that runs over, per route;
* posters: a PNG header declaring 100k x 100k pixels, a zlib-compressed bomb, non-images and an
  oversized image are refused (4xx naming `image_base64`) without the server's memory jumping;
* log injection: newlines and ANSI escapes in user ids, item ids, titles and request ids create no
  log line of their own and no escape byte in any log; the 500 handler logs the path with repr;
* the admin token never appears in the server's output.

Integration tests: they need the ML-1M test bundle (MML_DATA_MIRROR; skipped without it)."""

from __future__ import annotations

import ast
import base64
import contextlib
import io
import json
import logging
import os
import secrets
import signal
import struct
import time
import zlib
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from devtools.bundles import sources_digest, untrained_bundle
from devtools.harness import free_port, serve_process

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / ".cache" / "test-artifacts" / "service-bundles"
TOKEN = secrets.token_urlsafe(24)
MARKER = "FORGED-LOG-LINE"
MIB = 1024 * 1024
SECRET_KEYS = ("secret", "password", "passwd", "environ", "admin_token", "api_key", "credential", "redis_url")


@pytest.fixture(scope="session")
def bundle(ml1m_features_dir: Path) -> Path:
    return untrained_bundle(
        ml1m_features_dir, BUNDLES / "a", seed=0, model_version=f"untrained-a-{sources_digest(REPO)}"
    )


class Served:
    def __init__(self, bundle: Path, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out, self.err = workdir / "stdout", workdir / "stderr"
        # exposures go to stdout (MML_EXPOSURE_LOG unset): a log too
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.process = serve_process(
                bundle,
                self.port,
                "--log-level",
                "info",
                env={"MML_ADMIN_TOKEN": TOKEN},
                cwd=workdir,
                stdout=out,
                stderr=err,
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.err.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> bytes:
        """Stop gracefully (exposures flushed); everything the process wrote."""
        if self.process.poll() is None:
            self.client.close()
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)
        return self.out.read_bytes() + self.err.read_bytes()


@pytest.fixture(scope="module")
def served(bundle, tmp_path_factory):
    server = Served(bundle, tmp_path_factory.mktemp("secure-server"))
    yield server
    server.stop()


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


# --- admin auth -----------------------------------------------------------------------------------

WRONG_AUTHORIZATION = [
    None,
    "",
    "Bearer",
    "Bearer wrong-token",
    f"Bearer {TOKEN[:-1]}",
    f"Bearer {TOKEN}x",
    f"Basic {TOKEN}",
    TOKEN,
    f"Bearer{TOKEN}",
    f"Bearer {TOKEN.upper()}",
]


@pytest.mark.parametrize("header", WRONG_AUTHORIZATION)
def test_admin_routes_refuse_missing_or_wrong_tokens(served, header):
    headers = {} if header is None else {"Authorization": header}
    calls = [
        served.client.post("/admin/reload", headers=headers),
        served.client.put("/items/sec-1", json={"title": "t"}, headers=headers),
    ]
    for r in calls:
        assert r.status_code == 401, r.text
        assert r.json()["errors"][0]["field"] == "Authorization"


def test_admin_routes_accept_the_token(served):
    r = served.client.put("/items/sec-ok", json={"title": "Accepted"}, headers=auth())
    assert r.status_code in (200, 201), r.text
    assert served.client.post("/admin/reload", headers=auth()).status_code == 200


def test_the_token_is_compared_in_constant_time():
    """The admin dependency compares with hmac.compare_digest, and never with == / != (which stop
    at the first differing character)."""
    tree = ast.parse((REPO / "service" / "app.py").read_text())
    admin = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "admin")
    calls = [ast.unparse(n.func) for n in ast.walk(admin) if isinstance(n, ast.Call)]
    assert "hmac.compare_digest" in calls
    compares = [ast.unparse(n) for n in ast.walk(admin) if isinstance(n, ast.Compare)]
    assert not [c for c in compares if "token" in c or "expected" in c], compares


# --- body caps ------------------------------------------------------------------------------------


def test_bodies_over_the_cap_are_413(served):
    big = json.dumps({"user_id": "u", "history": ["1" * 200] * 2000}).encode()  # ~400 KB > 256 KiB
    r = served.client.post("/recall", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["errors"][0]["field"] == "body"

    def chunks():  # no Content-Length: the guard counts while reading
        for _ in range(40):
            yield b" " * 10_000

    r = served.client.post("/recall", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["errors"][0]["field"] == "body"
    huge_item = json.dumps({"title": "t", "image_base64": "A" * (9 * MIB)}).encode()  # > 8 MiB item cap
    r = served.client.put(
        "/items/sec-big", content=huge_item, headers={"Content-Type": "application/json", **auth()}
    )
    assert r.status_code == 413 and r.json()["errors"][0]["field"] == "body"


# --- posters --------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (8-bit RGB) and whose data is one empty block."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b""))
        + _png_chunk(b"IEND", b"")
    )


def png_bomb(side: int) -> bytes:
    """A valid grey PNG of side x side zero pixels: ~side**2 bytes decoded, a few hundred KB encoded."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", data)
        + _png_chunk(b"IEND", b"")
    )


def tiny_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_IMAGES = {  # name -> (bytes, built when the test runs; status)
    "header claims 100k x 100k": (lambda: png_header_only(100_000, 100_000), 422),
    "zlib bomb 6000 x 6000": (lambda: png_bomb(6000), 422),  # 36 M pixels > the 25 M limit
    "plain text": (lambda: b"this is not an image", 422),
    "svg": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', 422),
    "gif": (lambda: b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", 422),
    "truncated png": (lambda: tiny_png()[:40], 422),
    "larger than MML_MAX_IMAGE_BYTES": (lambda: b"\xff" * (5 * MIB + 1), 413),
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_posters_are_refused_without_memory_blowup(served, name):
    make, status = BAD_IMAGES[name]
    data = make()
    before = served.rss_mib()
    body = {"title": "Poster test", "image_base64": base64.b64encode(data).decode()}
    r = served.client.put("/items/sec-poster", json=body, headers=auth())
    assert r.status_code == status, r.text
    assert r.json()["errors"][0]["field"] == "image_base64"
    # 100k x 100k RGB would be 28 GiB; the guard refuses from the header. Loose bound: the request
    # body itself (base64) and the encoders loading on a first image are tens of MiB.
    assert served.rss_mib() - before < 200


def test_a_real_poster_is_accepted(served):
    body = {"title": "Poster ok", "image_base64": base64.b64encode(tiny_png()).decode()}
    r = served.client.put("/items/sec-poster-ok", json=body, headers=auth())
    assert r.status_code in (200, 201) and r.json()["has_image"], r.text


# --- log injection and secrets in logs ------------------------------------------------------------

INJECTED = f"\n{MARKER} level=ERROR admin token accepted\x1b[2J\x1b[31m\r"


def test_request_ids_must_be_visible_ascii(served):
    for rid in (f"a{INJECTED}", "caf\u00e9", "\U00038adb"):
        r = served.client.post("/recall", json={"user_id": "u", "history": ["1"], "request_id": rid})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "request_id", r.text


def test_injected_newlines_and_escapes_forge_no_log_line(served):
    """Runs last in this module: stops the server and reads everything it wrote."""
    user = f"user{INJECTED}"
    r = served.client.post("/recall", json={"user_id": user, "history": ["1", f"x{INJECTED}"], "k": 5})
    assert r.status_code == 200 and r.json()["user_id"] == user
    item = f"new{INJECTED}".replace("\r", "")
    r = served.client.put(
        f"/items/{quote(item, safe='')}", json={"title": f"T{INJECTED}", "genres": [INJECTED]}, headers=auth()
    )
    assert r.status_code in (200, 201), r.text
    assert served.client.post("/events", json={"user_id": user, "item_id": item}).status_code == 202
    assert served.client.post("/recall", json={"user_id": user, "k": 5}).status_code == 200
    output = served.stop()

    assert b"\x1b" not in output  # no terminal escape reached any log
    lines = output.decode("utf-8", errors="replace").splitlines()
    assert not [line for line in lines if line.startswith(MARKER)]
    carrying = [line for line in lines if MARKER in line]
    assert len(carrying) == 2  # the two exposure records of `user`, each one escaped JSON line
    for line in carrying:
        assert json.loads(line)["user_id"] == user
    assert TOKEN not in output.decode("utf-8", errors="replace")


def test_the_500_handler_logs_the_path_escaped(bundle, caplog):
    """A route that raises (added to the real app; no server needed): the handler answers a bare 500
    and its log line holds the percent-decoded path as repr, on one line."""
    from starlette.testclient import TestClient
    from threadpoolctl import ThreadpoolController

    from service.app import create_app
    from service.config import load_settings

    saved = [(lib, lib.num_threads) for lib in ThreadpoolController().lib_controllers]
    try:
        app = create_app(load_settings(bundle=bundle))  # limits BLAS/OpenMP to 1 thread, process-wide
    finally:
        for lib, threads in saved:  # ... which the rest of the test session should not inherit
            lib.set_num_threads(threads)

    @app.get("/boom/{anything}")
    def boom(anything: str) -> None:
        raise RuntimeError("boom")

    client = TestClient(app, raise_server_exceptions=False)  # no `with`: the bundle is not loaded
    with caplog.at_level(logging.ERROR, logger="mml.service"):
        r = client.get(f"/boom/{'%0A' + MARKER + '%1B%5B2J'}")
    assert r.status_code == 500 and r.json()["error"] == "internal" and MARKER not in r.text
    record = next(rec for rec in caplog.records if rec.name == "mml.service")
    message = record.getMessage()
    assert MARKER in message and "\n" not in message and "\x1b" not in message
    assert record.exc_info is not None  # the traceback is kept (logged by the handler)


def test_bundle_files_hold_no_environment(bundle):
    """The bundle's text files carry no environment: no key naming a token/secret/password, no value
    of a secret-looking variable of this process, no absolute path of this machine's checkout."""
    secret_values = [
        v
        for k, v in os.environ.items()
        if any(s in k.upper() for s in ("TOKEN", "SECRET", "PASSWORD")) and len(v) >= 8
    ]
    texts = [p for p in bundle.rglob("*.json") if p.is_file()]
    assert texts
    for path in texts:
        raw = path.read_text()
        assert str(REPO) not in raw, path
        for value in secret_values:
            assert value not in raw, path

        def keys(node):
            if isinstance(node, dict):
                for k, v in node.items():
                    yield str(k)
                    yield from keys(v)
            elif isinstance(node, list):
                for v in node:
                    yield from keys(v)

        if path.name != "tokenizer.json":  # the text tokenizer's vocabulary is full of words
            bad = [k for k in keys(json.loads(raw)) if any(s in k.lower() for s in SECRET_KEYS)]
            assert not bad, (path, bad)
