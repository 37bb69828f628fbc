"""Bad input gets a 4xx problem with a human reason and leaves no trace (no row, no blob, no file)."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import photo
from tests.server_harness import LiveServer, jpeg_bytes, png_bytes, test_settings, upload

LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def server(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = test_settings(tmp_path_factory.mktemp("data"), tiny_store, max_upload_bytes=LIMIT,
                             max_pixels=1_000_000, formats="PNG,JPEG,WEBP", max_layers=4)
    with LiveServer(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def ready_id(client: httpx.Client) -> str:
    r = client.post("/images", content=png_bytes(photo(64, 40)), params={"wait": "true"})
    assert r.status_code == 201
    return str(r.json()["id"])


def snapshot(server: LiveServer, client: httpx.Client) -> tuple[list[str], list[str]]:
    """Every image id and every stored file (the database files aside)."""
    ids = [it["id"] for it in client.get("/images", params={"limit": 100}).json()["items"]]
    files = sorted(str(p.relative_to(server.settings.data_dir))
                   for p in server.settings.data_dir.rglob("*")
                   if p.is_file() and not p.name.startswith("compass.db"))
    return ids, files


@pytest.fixture()
def no_trace(server: LiveServer, client: httpx.Client, ready_id: str) -> Iterator[None]:
    before = snapshot(server, client)
    yield
    assert snapshot(server, client) == before


def assert_problem(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    for w in words:
        assert w.lower() in body["detail"].lower(), body["detail"]


def truncated_png() -> bytes:
    data = png_bytes(photo(64, 48))
    return data[: len(data) // 2]


def bomb() -> bytes:
    """A 100-megapixel PNG that compresses to a few kilobytes (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < LIMIT
    return buf.getvalue()


@pytest.mark.usefixtures("no_trace")
@pytest.mark.parametrize(("name", "status", "words"), [
    ("empty raw body", 400, ["empty"]),
    ("empty file field", 400, ["empty"]),
    ("truncated png", 422, ["truncated"]),
    ("text named .jpg", 415, ["not an image"]),
    ("bmp (not in the allow-list)", 415, ["BMP", "allowed"]),
    ("100-megapixel bomb", 422, ["pixels"]),
    ("text/plain body", 415, ["content type"]),
    ("multipart without file", 422, ["file"]),
    ("broken multipart", 400, ["multipart"]),
])
def test_bad_uploads(client: httpx.Client, name: str, status: int, words: list[str]) -> None:
    if name == "empty raw body":
        r = client.post("/images", content=b"", headers={"Content-Type": "image/png"})
    elif name == "empty file field":
        r = upload(client, b"")
    elif name == "truncated png":
        r = upload(client, truncated_png())
    elif name == "text named .jpg":
        r = client.post("/images", files={"file": ("photo.jpg", b"hello, I am not a picture\n" * 4,
                                                   "image/jpeg")})
    elif name == "bmp (not in the allow-list)":
        buf = io.BytesIO()
        photo(20, 20).save(buf, format="BMP")
        r = upload(client, buf.getvalue(), filename="x.bmp")
    elif name == "100-megapixel bomb":
        r = upload(client, bomb())
    elif name == "text/plain body":
        r = client.post("/images", content=png_bytes(photo(20, 20)), headers={"Content-Type": "text/plain"})
    elif name == "multipart without file":
        r = client.post("/images", files={"image": ("a.png", png_bytes(photo(20, 20)), "image/png")})
    else:
        unfinished = b'--xyz\r\nContent-Disposition: form-data; name="file"\r\n\r\nab'
        r = client.post("/images", content=unfinished,
                        headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert_problem(r, status, *words)


@pytest.mark.usefixtures("no_trace")
@pytest.mark.parametrize(("params", "words"), [
    ({"widths": "abc"}, ["widths", "comma-separated integers", "'abc'"]),
    ({"scales": ""}, ["scales", "comma-separated numbers"]),
    ({"widths": "16,500"}, ["500", "outside"]),  # wider than the image
    ({"widths": "40,20"}, ["grow"]),
    ({"widths": "8,16,24,32,48"}, ["at most 4"]),
    ({"scales": "0,1"}, ["scale"]),
    ({"scales": "0.5", "widths": "32"}, ["not both"]),
    ({"quality": "99"}, ["quality"]),
    ({"quality": "nan"}, ["quality"]),
    ({"quality": "x"}, ["quality"]),
    ({"wait": "maybe"}, ["wait"]),
])
def test_bad_upload_options(client: httpx.Client, params: dict[str, str], words: list[str]) -> None:
    r = upload(client, png_bytes(photo(64, 48, seed=3)), **params)
    assert_problem(r, 422, *words)


@pytest.mark.usefixtures("no_trace")
def test_over_the_limit_with_content_length(client: httpx.Client) -> None:
    r = client.post("/images", content=b"\x89PNG" + bytes(LIMIT), headers={"Content-Type": "image/png"})
    assert_problem(r, 413, str(LIMIT))
    r = upload(client, b"\x89PNG" + bytes(LIMIT + 100 * 1024))
    assert_problem(r, 413, str(LIMIT))


@pytest.mark.usefixtures("no_trace")
def test_over_the_limit_streamed(client: httpx.Client) -> None:
    """A chunked body (no Content-Length) is counted while it streams; the client gets a clean 413."""
    def body() -> Iterator[bytes]:
        for _ in range(64):
            yield bytes(64 * 1024)

    r = client.post("/images", content=body(), headers={"Content-Type": "image/jpeg"})
    assert_problem(r, 413, "limit")


def raw_request(server: LiveServer, head: bytes, body: bytes) -> bytes:
    """Send a request whose body never ends; return what the server answers meanwhile."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(head + body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


@pytest.mark.usefixtures("no_trace")
def test_limit_is_enforced_before_the_body_ends(server: LiveServer) -> None:
    """The 413 comes while the client is still sending: the server stops reading at the limit."""
    chunk = bytes(32 * 1024)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(LIMIT // len(chunk) + 2))
    head = (b"POST /images HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    answer = raw_request(server, head, chunked)  # no terminating 0-chunk: the body is unfinished
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # A declared length over the limit is refused before any body byte is read.
    head = b"POST /images HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 999999999\r\n\r\n"
    assert raw_request(server, head, b"").startswith(b"HTTP/1.1 413")


@pytest.mark.usefixtures("no_trace")
@pytest.mark.parametrize(("width", "words"), [
    ("0", ["width", "greater than or equal to 1"]),
    ("-5", ["width"]),
    ("100000000", ["width", "less than or equal to"]),
    ("abc", ["width", "integer"]),
    ("1.5", ["width", "integer"]),
])
def test_bad_widths(client: httpx.Client, ready_id: str, width: str, words: list[str]) -> None:
    r = client.get(f"/images/{ready_id}", params={"width": width})
    assert_problem(r, 422, *words)
    assert r.json()["errors"][0]["location"] == "query parameter width"


@pytest.mark.usefixtures("no_trace")
def test_bad_format_and_dpr(client: httpx.Client, ready_id: str) -> None:
    assert_problem(client.get(f"/images/{ready_id}", params={"format": "gif"}), 422, "format",
                   "one of png, jpeg")
    assert_problem(client.get(f"/images/{ready_id}", params={"dpr": "0"}), 422, "dpr")
    assert_problem(client.get(f"/images/{ready_id}", params={"width": 2000, "dpr": 2}), 422, "maximum width")


@pytest.mark.usefixtures("no_trace")
def test_unknown_id(client: httpx.Client) -> None:
    for path in ("/images/0123abcd", "/images/0123abcd/manifest", "/images/0123abcd/bitstream"):
        assert_problem(client.get(path), 404, "0123abcd")
    assert_problem(client.delete("/images/0123abcd"), 404, "0123abcd")


@pytest.mark.usefixtures("no_trace")
def test_range_past_the_end(client: httpx.Client, ready_id: str) -> None:
    size = client.get(f"/images/{ready_id}/manifest").json()["size"]
    r = client.get(f"/images/{ready_id}/bitstream", headers={"Range": f"bytes={size + 10}-{size + 20}"})
    assert_problem(r, 416, str(size))
    assert r.headers["content-range"] == f"bytes */{size}"


def test_jpeg_with_exif_rotation_is_accepted(client: httpx.Client) -> None:
    """Control case: a valid JPEG passes the same checks (EXIF orientation applied)."""
    img = photo(60, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    r = client.post("/images", files={"file": ("r.jpg", buf.getvalue(), "image/jpeg")},
                    params={"wait": "true"})
    assert r.status_code == 201 and (r.json()["width"], r.json()["height"]) == (40, 60)
    assert r.json()["source_format"] == "JPEG"
    assert len(jpeg_bytes(img)) > 0
