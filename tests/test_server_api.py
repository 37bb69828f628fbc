"""The HTTP service end to end: real uvicorn on a real socket, httpx as the client, tiny model."""

from __future__ import annotations

import io
import re
from email.parser import BytesParser

import httpx
import numpy as np
import pytest
from PIL import Image

from compass_serve.codec import bitstream as bs
from compass_serve.codec.coder import Codec
from tests.conftest import photo
from tests.server_harness import LiveServer, png_bytes, upload, wait_ready

W, H = 120, 80
LADDER = [30, 60, 120]


@pytest.fixture(scope="module")
def image(client: httpx.Client) -> dict:
    """One image uploaded as multipart with a 3-layer ladder and polled to `ready`."""
    r = upload(client, png_bytes(photo(W, H)), widths=",".join(map(str, LADDER)))
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "pending" and r.headers["location"] == f"/images/{body['id']}/manifest"
    manifest = wait_ready(client, body["id"])
    assert manifest["status"] == "ready", manifest
    return manifest


@pytest.fixture(scope="module")
def stream(client: httpx.Client, image: dict) -> bytes:
    r = client.get(f"/images/{image['id']}/bitstream")
    assert r.status_code == 200
    return r.content


def decode_png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# -- upload and manifest -------------------------------------------------------------------------
def test_manifest_describes_the_stream(image: dict, stream: bytes) -> None:
    assert (image["width"], image["height"], image["model"]) == (W, H, "tiny")
    assert image["byte_ranges"] == "inclusive"
    layers = image["layers"]
    assert [la["width"] for la in layers] == LADDER
    header = bs.parse_header(stream)
    assert image["header_length"] == header.size == layers[0]["byte_start"]
    assert image["size"] == len(stream) == layers[-1]["byte_end"] + 1
    for la, entry in zip(layers, header.table, strict=True):
        assert (la["byte_start"], la["byte_end"]) == (entry.offset, entry.end - 1)
        assert la["length"] == la["byte_end"] - la["byte_start"] + 1
        assert la["prefix_range"] == f"bytes=0-{la['byte_end']}"


def test_each_layer_fetched_by_range_decodes_to_that_layer(
    client: httpx.Client, image: dict, stream: bytes, tiny_codec: Codec
) -> None:
    url = f"/images/{image['id']}/bitstream"
    head = client.get(url, headers={"Range": f"bytes=0-{image['header_length'] - 1}"})
    assert head.status_code == 206
    assembled = head.content
    for k, la in enumerate(image["layers"]):
        # The layer's own bytes, with the Range built straight from the manifest...
        r = client.get(url, headers={"Range": f"bytes={la['byte_start']}-{la['byte_end']}"})
        assert r.status_code == 206
        assert r.headers["content-range"] == f"bytes {la['byte_start']}-{la['byte_end']}/{len(stream)}"
        assert len(r.content) == la["length"]
        assembled += r.content
        # ...and the prefix that holds header + layers 0..k.
        prefix = client.get(url, headers={"Range": la["prefix_range"]})
        assert prefix.status_code == 206 and prefix.content == assembled
        out = tiny_codec.decode(prefix.content)
        assert out.layer == k and not out.truncated
        assert out.image.size == (la["width"], la["height"])
    assert assembled == stream


def test_raw_body_wait_true_gives_201_and_same_bytes_give_same_id(client: httpx.Client) -> None:
    data = png_bytes(photo(64, 48, seed=7))
    r = client.post("/images", params={"wait": "true", "scales": "0.5,1"}, content=data,
                    headers={"Content-Type": "image/png"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "ready" and [la["width"] for la in body["layers"]] == [32, 64]
    assert r.headers["location"] == f"/images/{body['id']}"
    # The same bytes and options: same id, nothing new encoded.
    again = client.post("/images", params={"scales": "0.5,1"}, content=data,
                        headers={"Content-Type": "application/octet-stream"})
    assert again.status_code == 200 and again.json()["id"] == body["id"]
    # The declared type is not trusted: a PNG sent as image/jpeg is still a PNG.
    lying = upload(client, data, filename="x.jpg", scales="0.5,1")
    assert lying.json()["id"] == body["id"] and lying.json()["source_format"] == "PNG"
    # Other options (or another quality) make another image.
    other = client.post("/images", params={"scales": "0.5,1", "quality": 2}, content=data)
    assert other.status_code == 202 and other.json()["id"] != body["id"]
    assert wait_ready(client, other.json()["id"])["quality"] == 2


# -- width-matched renditions --------------------------------------------------------------------
@pytest.mark.parametrize(("width", "layer"), [
    (17, 0),   # below the base layer
    (30, 0),   # at a layer width
    (45, 1),   # between layers
    (60, 1),
    (119, 2),
    (120, 2),  # full size
    (200, 2),  # above the top layer: LIFF upsampling from the top layer
])
def test_width_matched_get(client: httpx.Client, image: dict, stream: bytes, tiny_codec: Codec,
                           width: int, layer: int) -> None:
    r = client.get(f"/images/{image['id']}", params={"width": width, "format": "png"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-compass-layer"] == str(layer)
    img = decode_png(r.content)
    assert img.size == (width, max(1, round(H * width / W)))
    # Exactly what the codec makes from the full stream for that width.
    expected = tiny_codec.decode(stream, width=width)
    assert expected.layer == layer
    assert np.array_equal(np.asarray(img), np.asarray(expected.image))


def test_full_size_and_dpr(client: httpx.Client, image: dict) -> None:
    r = client.get(f"/images/{image['id']}", params={"format": "png"})
    assert decode_png(r.content).size == (W, H)
    r = client.get(f"/images/{image['id']}", params={"format": "png", "width": 50, "dpr": 2})
    assert decode_png(r.content).size == (100, round(H * 100 / W))


def test_rendition_cache_etag_and_304(client: httpx.Client, image: dict) -> None:
    url = f"/images/{image['id']}"
    first = client.get(url, params={"width": 77, "format": "jpeg"})
    assert first.status_code == 200 and first.headers["x-compass-cache"] == "miss"
    second = client.get(url, params={"width": 77, "format": "jpeg"})
    assert second.headers["x-compass-cache"] == "hit" and second.content == first.content
    etag = first.headers["etag"]
    assert etag.startswith('"') and second.headers["etag"] == etag
    assert first.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert first.headers["vary"] == "Accept"
    for inm in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
        r = client.get(url, params={"width": 77, "format": "jpeg"}, headers={"If-None-Match": inm})
        assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
    r = client.get(url, params={"width": 77, "format": "jpeg"}, headers={"If-None-Match": '"other"'})
    assert r.status_code == 200
    # Another width or format is another representation.
    assert client.get(url, params={"width": 78, "format": "jpeg"}).headers["etag"] != etag


@pytest.mark.parametrize(("accept", "expected"), [
    (None, "image/webp"),
    ("*/*", "image/webp"),
    ("image/png", "image/png"),
    ("image/jpeg, image/png;q=0.5", "image/jpeg"),
    ("image/avif,image/webp,image/apng,image/*,*/*;q=0.8", "image/webp"),
    ("image/avif;q=1, image/webp;q=0.9", "image/avif"),
    ("image/*;q=0.5, image/png", "image/png"),
    ("image/webp;q=0, image/*", "image/avif"),
])
def test_format_negotiation(client: httpx.Client, image: dict, accept: str | None, expected: str) -> None:
    headers = {"Accept": accept} if accept is not None else {}
    if accept is None:
        headers = {"Accept": ""}
    r = client.get(f"/images/{image['id']}", params={"width": 40}, headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == expected
    assert r.headers["vary"] == "Accept"
    fmt = expected.split("/")[1].upper()
    assert Image.open(io.BytesIO(r.content)).format == fmt


def test_explicit_format_wins_and_406(client: httpx.Client, image: dict) -> None:
    url = f"/images/{image['id']}"
    r = client.get(url, params={"width": 40, "format": "jpeg"}, headers={"Accept": "image/png"})
    assert r.headers["content-type"] == "image/jpeg"
    r = client.get(url, params={"width": 40}, headers={"Accept": "text/html"})
    assert r.status_code == 406 and r.headers["content-type"] == "application/problem+json"
    assert "Accept" in r.json()["detail"]


# -- byte ranges on the bitstream ----------------------------------------------------------------
def test_bitstream_full_and_validators(client: httpx.Client, image: dict, stream: bytes) -> None:
    url = f"/images/{image['id']}/bitstream"
    r = client.get(url)
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["etag"] == image["etag"] and not r.headers["etag"].startswith("W/")
    assert r.headers["content-length"] == str(len(stream))
    r = client.get(url, headers={"If-None-Match": image["etag"]})
    assert r.status_code == 304 and r.content == b""
    h = client.head(url)
    assert h.status_code == 200 and h.headers["content-length"] == str(len(stream)) and h.content == b""


def test_single_suffix_open_ranges(client: httpx.Client, image: dict, stream: bytes) -> None:
    url = f"/images/{image['id']}/bitstream"
    n = len(stream)
    cases = {"bytes=0-0": stream[:1], "bytes=-10": stream[-10:], "bytes=5-": stream[5:],
             f"bytes=3-{n + 100}": stream[3:], "bytes=-100000": stream}
    for spec, expected in cases.items():
        r = client.get(url, headers={"Range": spec})
        assert r.status_code == 206, spec
        assert r.content == expected, spec
        start = n - len(expected)
        start = 0 if spec == "bytes=0-0" else start
        assert r.headers["content-range"] == f"bytes {start}-{start + len(expected) - 1}/{n}", spec


def test_multi_range(client: httpx.Client, image: dict, stream: bytes) -> None:
    url = f"/images/{image['id']}/bitstream"
    layers = image["layers"]
    # Layers 0 and 2 (not adjacent: Starlette coalesces touching ranges, which RFC 9110 allows).
    picked = [layers[0], layers[2]]
    spec = "bytes=0-3," + ",".join(f"{la['byte_start']}-{la['byte_end']}" for la in picked)
    r = client.get(url, headers={"Range": spec})
    assert r.status_code == 206
    ctype = r.headers["content-type"]
    assert ctype.startswith("multipart/byteranges; boundary=")
    parts = parse_byteranges(ctype, r.content)
    expect = [(0, 3)] + [(la["byte_start"], la["byte_end"]) for la in picked]
    assert [(a, b) for a, b, _ in parts] == expect
    for a, b, body in parts:
        assert body == stream[a : b + 1]
    # Touching ranges come back coalesced into one part.
    a, b = layers[0], layers[1]
    both = f"bytes={a['byte_start']}-{a['byte_end']},{b['byte_start']}-{b['byte_end']}"
    r = client.get(url, headers={"Range": both})
    assert r.status_code == 206 and r.content == stream[layers[0]["byte_start"] : layers[1]["byte_end"] + 1]


def parse_byteranges(ctype: str, body: bytes) -> list[tuple[int, int, bytes]]:
    msg = BytesParser().parsebytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body)
    out = []
    for part in msg.get_payload():
        m = re.fullmatch(r"bytes (\d+)-(\d+)/\d+", part["Content-Range"])
        assert m is not None
        out.append((int(m.group(1)), int(m.group(2)), part.get_payload(decode=True)))
    return out


def test_416_and_ignored_ranges(client: httpx.Client, image: dict, stream: bytes) -> None:
    url = f"/images/{image['id']}/bitstream"
    n = len(stream)
    r = client.get(url, headers={"Range": f"bytes={n}-"})
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{n}"
    assert r.headers["content-type"] == "application/problem+json" and r.json()["status"] == 416
    assert client.get(url, headers={"Range": "bytes=-0"}).status_code == 416
    # A set with one satisfiable range serves that range (RFC 9110 §14.1.1).
    r = client.get(url, headers={"Range": f"bytes=0-1,{n + 5}-{n + 9}"})
    assert r.status_code == 206 and r.content == stream[:2]
    # Invalid Range headers are ignored: the full representation.
    for bad in ("bytes=5-2", "bytes=abc", "items=0-1", "bytes=", "0-10"):
        r = client.get(url, headers={"Range": bad})
        assert r.status_code == 200 and r.content == stream, bad


def test_if_range(client: httpx.Client, image: dict, stream: bytes) -> None:
    url = f"/images/{image['id']}/bitstream"
    r = client.get(url, headers={"Range": "bytes=0-9", "If-Range": image["etag"]})
    assert r.status_code == 206 and r.content == stream[:10]
    r = client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert r.status_code == 200 and r.content == stream
    r = client.get(url, headers={"Range": "bytes=0-9", "If-Range": f"W/{image['etag']}"})
    assert r.status_code == 200  # weak validators never match If-Range
    # A stale If-Range also turns an unsatisfiable range into the full 200.
    r = client.get(url, headers={"Range": f"bytes={len(stream)}-", "If-Range": '"stale"'})
    assert r.status_code == 200


# -- list, delete, errors, operations ------------------------------------------------------------
def test_list_pagination(client: httpx.Client, image: dict) -> None:
    ids = []
    for seed in range(3):
        r = client.post("/images", content=png_bytes(photo(40, 30, seed=100 + seed)), params={"wait": "true"})
        assert r.status_code == 201
        ids.append(r.json()["id"])
    seen: list[str] = []
    url: str | None = "/images?limit=2"
    while url:
        page = client.get(url).json()
        assert len(page["items"]) <= 2
        seen += [it["id"] for it in page["items"]]
        url = page["next"]
    assert len(seen) == len(set(seen))
    assert image["id"] in seen and set(ids) <= set(seen)
    assert seen.index(ids[0]) < seen.index(ids[1]) < seen.index(ids[2])  # upload order
    ready = client.get("/images", params={"status": "ready", "limit": 100}).json()["items"]
    assert all(it["status"] == "ready" for it in ready)


def test_delete_removes_everything(client: httpx.Client, server: LiveServer) -> None:
    r = client.post("/images", content=png_bytes(photo(48, 40, seed=55)), params={"wait": "true"})
    iid = r.json()["id"]
    assert client.get(f"/images/{iid}", params={"width": 20, "format": "png"}).status_code == 200
    data_dir = server.settings.data_dir
    assert any(iid in str(p) for p in data_dir.rglob("*"))
    assert client.delete(f"/images/{iid}").status_code == 204
    for path in (f"/images/{iid}", f"/images/{iid}/manifest", f"/images/{iid}/bitstream"):
        r = client.get(path)
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    assert not any(iid in str(p) for p in data_dir.rglob("*"))
    assert client.delete(f"/images/{iid}").status_code == 404


def test_framework_errors_are_problems(client: httpx.Client) -> None:
    r = client.get("/no/such/route")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["detail"]
    r = client.put("/images")
    assert r.status_code == 405 and r.json()["status"] == 405 and "allow" in r.headers
    r = client.get("/images", params={"limit": 0})
    body = r.json()
    assert r.status_code == 422 and body["errors"][0]["location"] == "query parameter limit"


def test_model_describes_the_encoder(client: httpx.Client, image: dict, tiny_codec: Codec) -> None:
    r = client.get("/model")
    assert r.status_code == 200, r.text
    m = r.json()
    assert (m["name"], m["weights_id"]) == (image["model"], image["weights_id"])
    assert m["qualities"] == len(m["lambdas"]) == tiny_codec.qualities
    assert m["lambdas"] == sorted(m["lambdas"])
    assert m["default_quality"] == tiny_codec.model.default_quality
    assert image["quality"] == m["default_quality"]  # the fixture's upload named no quality
    # The range it states is the one uploads are held to.
    top = upload(client, png_bytes(photo(W, H)), quality=m["qualities"] + 0.5)
    assert top.status_code == 422 and f"1..{m['qualities']}" in top.json()["detail"]


def test_health_ready_metrics_docs(client: httpx.Client, image: dict) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and set(ready.json()["checks"].values()) == {"ok"}
    client.get(f"/images/{image['id']}", params={"width": 33})
    client.get(f"/images/{image['id']}", params={"width": 33})
    text = client.get("/metrics").text
    for name in ("compass_http_request_duration_seconds_bucket", "compass_encode_duration_seconds_count",
                 "compass_decode_duration_seconds_count", "compass_encode_queue_depth",
                 "compass_rendition_cache_hit_ratio"):
        assert name in text, name
    assert 'route="/images/{image_id}"' in text  # route templates, not raw paths
    ratio = float(re.search(r"^compass_rendition_cache_hit_ratio (\S+)$", text, re.M).group(1))
    assert 0 < ratio < 1
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/images", "/images/{image_id}", "/images/{image_id}/manifest",
            "/images/{image_id}/bitstream", "/model", "/healthz", "/readyz",
            "/metrics"} <= set(schema["paths"])
    err = schema["paths"]["/images/{image_id}"]["get"]["responses"]["404"]["content"]
    assert "application/problem+json" in err
