"""HTTP benchmark: width-matched renditions against a static file and an imgproxy-style resize.

    .venv/bin/python benchmarks/http_bench.py                      # shipped `lite` weights
    .venv/bin/python benchmarks/http_bench.py --model tiny --model-store DIR

In one run, on this machine, over loopback with keep-alive connections:

  (a) a cached `GET /images/{id}?width=W` rendition from compass-serve,
  (b) the same bytes from a plain Starlette `FileResponse` (the floor for serving a file),
  (c) an on-the-fly Pillow resize of a stored JPEG to width W (what imgproxy-style services do),
  (d) a cold decode (cache miss) for each target width,

reporting requests/s and p50/p99 latency, and the ratios (a)/(b) and (a)/(c). The servers run
in their own processes (uvicorn, one worker each); the client is httpx in this process, so on a
small machine the client's own CPU use is part of every figure. Request counts are bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
KODAK_IMAGE = REPO.parent / "shared" / "data" / "kodak" / "kodim23.png"


# -- servers (run as subprocesses of this script) --------------------------------------------------------
def run_compass(a: argparse.Namespace) -> None:
    import uvicorn

    from compass_serve.allocator import retain_freed_memory
    from compass_serve.server import Settings, create_app

    retain_freed_memory()  # as `compass-serve serve` runs
    settings = Settings(data_dir=Path(a.data_dir), model=a.model, output_quality=a.quality,
                        model_store=Path(a.model_store) if a.model_store else None)
    uvicorn.run(create_app(settings), host="127.0.0.1", port=a.port, log_level="warning", access_log=False)


def run_baseline(a: argparse.Namespace) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, Response
    from starlette.routing import Route

    static_path = a.static
    jpeg_path = a.jpeg
    quality = a.quality

    async def static(_request: Request) -> FileResponse:
        return FileResponse(static_path, media_type="image/jpeg")

    def resize(request: Request) -> Response:
        # Sync endpoint: Starlette runs it in its thread pool, as a Pillow-based service would.
        width = int(request.query_params["width"])
        with Image.open(jpeg_path) as img:
            img = img.convert("RGB")
            height = max(1, round(img.height * width / img.width))
            out = img.resize((width, height), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=quality)
        return Response(buf.getvalue(), media_type="image/jpeg")

    async def resize_async(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(resize, request)

    app = Starlette(routes=[Route("/static", static), Route("/resize", resize_async)])
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning", access_log=False)


# -- client side ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(args: list[str], port: int, ready_path: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, __file__, *args, "--port", str(port)], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code < 500:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"server on port {port} did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


async def load(url: str, n: int, concurrency: int, expect: bytes | None = None) -> dict[str, float]:
    """`n` GETs of `url` by `concurrency` keep-alive connections; throughput and latency."""
    latencies: list[float] = []
    remaining = n
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await client.get(url)  # open a connection, warm whatever the server warms

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                t0 = time.perf_counter()
                r = await client.get(url)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200 or (expect is not None and r.content != expect):
                    raise RuntimeError(f"{url}: unexpected answer {r.status_code}")

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    return {"requests": n, "rps": n / wall, "p50_ms": 1000 * percentile(latencies, 50),
            "p99_ms": 1000 * percentile(latencies, 99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lite")
    ap.add_argument("--model-store", default=None)
    ap.add_argument("--image", default=None, help="default: Kodak kodim23 if present, else synthetic")
    ap.add_argument("--width", type=int, default=480, help="rendition width for (a), (b), (c)")
    ap.add_argument("--cold-widths", default="160,320,480,768,1024",
                    help="target widths for (d); above the top layer means LIFF upsampling")
    ap.add_argument("--cold-repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=400, help="requests for (a) and (b)")
    ap.add_argument("--resize-requests", type=int, default=100, help="requests for (c)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--quality", type=int, default=85, help="JPEG quality of every output")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    # internal: server roles
    ap.add_argument("--role", choices=["client", "compass", "baseline"], default="client",
                    help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--static", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--jpeg", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role == "compass":
        run_compass(a)
        return
    if a.role == "baseline":
        run_baseline(a)
        return
    sys.path.insert(0, str(REPO))
    results = asyncio.run(bench(a))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")


async def bench(a: argparse.Namespace) -> dict[str, Any]:
    from tests.conftest import photo

    if a.image:
        source = Image.open(a.image).convert("RGB")
    elif KODAK_IMAGE.exists():
        source = Image.open(KODAK_IMAGE).convert("RGB")
    else:
        source = photo(768, 512)
    work = Path(tempfile.mkdtemp(prefix="compass-bench-"))
    jpeg_path = work / "stored.jpg"
    source.save(jpeg_path, format="JPEG", quality=95)
    png = io.BytesIO()
    source.save(png, format="PNG")

    procs: list[subprocess.Popen[bytes]] = []
    try:
        port = free_port()
        args = ["--role", "compass", "--data-dir", str(work / "data"), "--model", a.model,
                "--quality", str(a.quality)]
        if a.model_store:
            args += ["--model-store", a.model_store]
        procs.append(spawn(args, port, "/readyz", work / "compass.log"))
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=1800) as c:
            t0 = time.perf_counter()
            r = await c.post("/images", content=png.getvalue(), params={"wait": "true"})
            encode_s = time.perf_counter() - t0
            if r.status_code not in (200, 201):
                raise RuntimeError(f"upload failed: {r.status_code} {r.text}")
            manifest = r.json()
            # (d) cold decodes: each request a width not decoded before (w, w-1, ...).
            cold: dict[str, dict[str, float]] = {}
            for w in (int(x) for x in a.cold_widths.split(",")):
                times = []
                for rep in range(a.cold_repeats):
                    t0 = time.perf_counter()
                    resp = await c.get(f"/images/{manifest['id']}",
                                       params={"width": w - rep, "format": "jpeg"})
                    times.append(time.perf_counter() - t0)
                    if resp.headers.get("x-compass-cache") != "miss":
                        raise RuntimeError("cold request hit the cache")
                cold[str(w)] = {"layer": int(resp.headers["x-compass-layer"]),
                                "p50_ms": 1000 * statistics.median(times), "max_ms": 1000 * max(times)}

            image_url = f"{base}/images/{manifest['id']}?width={a.width}&format=jpeg"
            first = await c.get(image_url)  # fills the rendition cache (if (d) did not)
            cached = first.content
            static_path = work / "rendition.jpg"
            static_path.write_bytes(cached)

        bport = free_port()
        procs.append(spawn(["--role", "baseline", "--static", str(static_path), "--jpeg", str(jpeg_path),
                            "--quality", str(a.quality)], bport, "/static", work / "baseline.log"))
        bbase = f"http://127.0.0.1:{bport}"

        res_a = await load(image_url, a.requests, a.concurrency, expect=cached)
        res_b = await load(f"{bbase}/static", a.requests, a.concurrency, expect=cached)
        res_c = await load(f"{bbase}/resize?width={a.width}", a.resize_requests, a.concurrency)
    finally:
        for p in procs:
            stop(p)
        shutil.rmtree(work, ignore_errors=True)

    layers = " -> ".join(f"{la['width']}x{la['height']}" for la in manifest["layers"])
    print(f"image {source.width}x{source.height}, model {a.model}, layers {layers}, "
          f"stream {manifest['size']} bytes, encode {encode_s:.2f} s (upload with wait=true)")
    print(f"rendition width {a.width}: {len(cached)} bytes JPEG q{a.quality}; "
          f"{a.concurrency} connections; {os.cpu_count()} CPUs")
    print(f"{'case':<44} {'requests':>8} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    rows = [("(a) cached ?width= rendition (compass-serve)", res_a),
            ("(b) static FileResponse, same bytes", res_b),
            ("(c) Pillow resize of a stored JPEG", res_c)]
    for name, res in rows:
        print(f"{name:<44} {res['requests']:>8} {res['rps']:>9.1f} {res['p50_ms']:>8.2f} "
              f"{res['p99_ms']:>8.2f}")
    print("(d) cold decode (cache miss), sequential:")
    for w, res in cold.items():
        print(f"    width {w:>5} (from layer {res['layer']}): p50 {res['p50_ms']:8.1f} ms, "
              f"max {res['max_ms']:8.1f} ms over {a.cold_repeats}")
    print(f"ratio (a)/(b) throughput {res_a['rps'] / res_b['rps']:.2f}, "
          f"p50 latency {res_a['p50_ms'] / res_b['p50_ms']:.2f}")
    print(f"ratio (a)/(c) throughput {res_a['rps'] / res_c['rps']:.2f}, "
          f"p50 latency {res_a['p50_ms'] / res_c['p50_ms']:.2f}")
    return {"image": [source.width, source.height], "model": a.model, "width": a.width,
            "concurrency": a.concurrency, "encode_s": encode_s, "cached": res_a, "static": res_b,
            "pillow_resize": res_c, "cold": cold,
            "ratio_a_b_rps": res_a["rps"] / res_b["rps"], "ratio_a_c_rps": res_a["rps"] / res_c["rps"]}


if __name__ == "__main__":
    main()
