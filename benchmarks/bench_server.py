"""Explorer server on loopback: view switching, 16 concurrent clients, switching while
expensive jobs run, first view of a new image, and a memory soak.

The server runs in its own process (``uvicorn`` on 127.0.0.1, the bundled pretrained
EfficientNet-Lite0, 224x224); clients are threads of this process using keep-alive HTTP
connections. A *layer switch* is what the page requests when a layer is selected
(``/api/grid`` then ``/api/grid.png``); a *channel switch* is ``/api/channel``,
``/api/channel.png`` and, for conv layers, ``/api/filters.png``. Settings (normalisation,
colour map, sort, channel count) vary between switches, so no response repeats.

The soak (``--soak SECONDS``, default 600; 20 with ``--quick``) mixes uploads of new
images, switches, CAMs and Score-CAM jobs from 4 clients and samples the server's RSS.
"""

from __future__ import annotations

import http.client
import io
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

TITLE = "Explorer server (convscope serve)"

SERVER_CODE = """
import os, sys, torch, uvicorn
if os.environ.get("BENCH_TORCH_THREADS"):
    torch.set_num_threads(int(os.environ["BENCH_TORCH_THREADS"]))
from convscope.server import Settings, create_app
extra = {}
if os.environ.get("BENCH_WORKER_THREADS"):  # 0: FastAPI's default pool (40 threads)
    extra["worker_threads"] = int(os.environ["BENCH_WORKER_THREADS"]) or None
if os.environ.get("BENCH_FAST_THREADS"):
    extra["fast_threads"] = int(os.environ["BENCH_FAST_THREADS"])
if os.environ.get("BENCH_SWITCH_INTERVAL"):  # experiments: the GIL's switch interval
    sys.setswitchinterval(float(os.environ["BENCH_SWITCH_INTERVAL"]))
if os.environ.get("BENCH_FAST_PATH") == "0":  # every request through FastAPI
    extra["fast_path"] = False
app = create_app(Settings(models=["efficientnet_lite0"], device="cpu", cache_entries=8,
                          **extra))
app.state.convscope.models["efficientnet_lite0"].get()
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""

LAYERS = ["_conv_stem", "_blocks.0", "_blocks.1._expand_conv", "_blocks.1", "_blocks.2",
          "_blocks.3._depthwise_conv", "_blocks.3", "_blocks.4", "_blocks.5._expand_conv",
          "_blocks.6", "_blocks.8", "_blocks.9._depthwise_conv", "_blocks.10", "_blocks.11",
          "_blocks.12._expand_conv", "_blocks.13", "_blocks.14", "_blocks.15", "_conv_head"]
SETTINGS = [
    {"normalize": "channel", "cmap": "viridis", "sort": "", "count": 64},
    {"normalize": "layer", "cmap": "magma", "sort": "mean", "count": 32},
    {"normalize": "channel", "cmap": "gray", "sort": "max", "count": 48},
    {"normalize": "none", "cmap": "inferno", "sort": "", "count": 16},
]
IMAGE = "sample:chelsea"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Client:
    """One keep-alive connection; ``get`` returns the body and raises on non-200 (``raw``
    returns the status too)."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def raw(self, method: str, path: str, params: dict | None = None,
            body: bytes | None = None) -> tuple[int, bytes]:
        url = path + ("?" + urlencode(params) if params else "")
        try:
            return self._send(method, url, body)
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            # A keep-alive connection that idled past the server's timeout: reconnect
            # once, as browsers do. A server that is really gone fails again here.
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            return self._send(method, url, body)

    def request(self, method: str, path: str, params: dict | None = None,
                body: bytes | None = None) -> bytes:
        status, data = self.raw(method, path, params, body)
        if status != 200:
            raise RuntimeError(f"{method} {path} -> {status}: {data[:200]!r}")
        return data

    def _send(self, method: str, url: str, body: bytes | None) -> tuple[int, bytes]:
        headers = {"Content-Type": "image/png"} if body is not None else {}
        self.conn.request(method, url, body=body, headers=headers)
        response = self.conn.getresponse()
        return response.status, response.read()

    def get(self, path: str, **params) -> bytes:
        return self.request("GET", path, params)


def layer_switch(client: Client, layer: str, settings: dict, image: str = IMAGE) -> dict:
    params = {"image": image, "layer": layer, **settings}
    info = json.loads(client.get("/api/grid", **params))
    client.get("/api/grid.png", **params)
    return info


def channel_switch(client: Client, layer: str, channel: int, cmap: str, conv: bool,
                   image: str = IMAGE) -> None:
    params = {"image": image, "layer": layer, "channel": channel}
    client.get("/api/channel", **params)
    client.get("/api/channel.png", **params, cmap=cmap)
    if conv:
        client.get("/api/filters.png", layer=layer, channel=channel)


class Workload:
    """A random but reproducible sequence of layer and channel switches."""

    def __init__(self, client: Client, seed: int, shapes: dict[str, list[int]],
                 conv: set[str]):
        self.client = client
        self.rng = random.Random(seed)
        self.shapes = shapes
        self.conv = conv

    def step(self) -> tuple[str, float]:
        layer = self.rng.choice(LAYERS)
        start = time.perf_counter()
        if self.rng.random() < 0.5:
            layer_switch(self.client, layer, self.rng.choice(SETTINGS))
            kind = "layer"
        else:
            channel = self.rng.randrange(self.shapes[layer][0])
            channel_switch(self.client, layer, channel, self.rng.choice(SETTINGS)["cmap"],
                           layer in self.conv)
            kind = "channel"
        return kind, time.perf_counter() - start


def _percentiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return pick(0.50) * 1000, pick(0.95) * 1000, pick(0.99) * 1000


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) from /proc (0 if unknown)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values) - idle) / tick, sum(values) / tick


def _run_clients(port: int, count: int, seconds: float, shapes, conv,
                 server_pid: int = 0) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    done = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker(seed: int) -> None:
        work = Workload(Client(port), seed, shapes, conv)
        while time.perf_counter() < stop:
            try:
                _, elapsed = work.step()
            except Exception as error:
                with lock:
                    errors.append(str(error)[:200])
                continue
            with lock:
                latencies.append(elapsed)
                done[0] += 1

    start = time.perf_counter()
    server_cpu, client_cpu = _cpu_seconds(server_pid), time.process_time()
    busy, total = _machine_busy()
    threads = [threading.Thread(target=worker, args=(1000 + i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    busy_after, total_after = _machine_busy()
    cores = (os.cpu_count() or 1)
    return {"switches": done[0], "errors": errors, "wall": wall,
            "throughput": done[0] / wall, "latencies": latencies,
            "server_cores": (_cpu_seconds(server_pid) - server_cpu) / wall,
            "client_cores": (time.process_time() - client_cpu) / wall,
            "machine_cores": cores * (busy_after - busy) / max(total_after - total, 1e-9),
            "server_ms": 1000 * (_cpu_seconds(server_pid) - server_cpu) / max(done[0], 1)}


def _new_image_bytes(seed: int) -> bytes:
    """A photo the server has not seen (a sample with a few pixels changed), as PNG."""
    import numpy as np
    from PIL import Image

    from convscope.images import load_image

    array = np.asarray(load_image("sample:coffee")).copy()
    array[seed % array.shape[0], :8] = (seed * 37) % 256
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _first_view_server(client: Client, data: bytes, layer: str) -> float:
    """What the page does for a new image: upload, top-5 (naming the shown layer, so the
    forward pass captures it first), input, grid JSON + PNG."""
    start = time.perf_counter()
    image_id = json.loads(client.request("POST", "/api/images", body=data))["id"]
    client.get("/api/predict", image=image_id, k=5, layer=layer)
    client.get("/api/input.png", image=image_id)
    layer_switch(client, layer, SETTINGS[0], image=image_id)
    return time.perf_counter() - start


def _page_grid_layout(act, count: int = 64) -> tuple[int, int, int]:
    """Channels, columns and tile size of the grid the page shows (``grid_layout`` in
    ``convscope/server/views.py``, written out so the baseline uses no server code)."""
    channels, height, width = act.shape
    count = max(1, min(count, channels))
    cols = max(1, min(count, math.ceil(math.sqrt(count * height / max(width, 1)))))
    tile = max(8, min(max(height, width) * 8, 640 // cols))
    return count, cols, tile


def _first_view_pictures(model, data: bytes, layer: str, native: bool = False):
    """The same work in-process with the library calls the CLI makes: decode, preprocess,
    one forward pass capturing the layer with top-5, the layer's statistics (the page shows
    them), and the two pictures the page gets: the grid (same channels, columns and tile
    size as the page's) and the input as the model sees it. ``native``: the grid at the
    activation's own size (for _blocks.3: 28 px tiles instead of the page's 84; the
    baseline before this stop, kept as a second row)."""
    from convscope.hooks import capture
    from convscope.images import load_image
    from convscope.render.convert import to_pil
    from convscope.render.grid import feature_grid
    from convscope.stats import layer_summary

    image = load_image(data)
    x = model.preprocess(image)
    with capture(model.module, [layer]) as acts:
        model.predict(x, k=5)
    act = acts[layer][0]
    layer_summary(act)
    if native:
        grid = feature_grid(act, channels=64)
    else:
        count, cols, tile = _page_grid_layout(act)
        grid = feature_grid(act, channels=count, cols=cols, tile_size=tile)
    display = to_pil(model.transform.to_display(x[0]))
    encoded = []
    for picture in (grid, display):  # the library's way to write a PNG (Pillow, level 1)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", compress_level=1)
        encoded.append(buffer.getvalue())
    return encoded


def _first_view_library(model, data: bytes, layer: str, native: bool = False) -> float:
    start = time.perf_counter()
    _first_view_pictures(model, data, layer, native)
    return time.perf_counter() - start


def _same_pictures(client: Client, model, layer: str) -> bool:
    """Whether the baseline draws exactly the pixels the server sends for one image."""
    import numpy as np
    from PIL import Image

    data = _new_image_bytes(4242)
    image_id = json.loads(client.request("POST", "/api/images", body=data))["id"]
    client.get("/api/predict", image=image_id, k=5, layer=layer)
    served = [client.get("/api/grid.png", image=image_id, layer=layer, **SETTINGS[0]),
              client.get("/api/input.png", image=image_id)]
    mine = _first_view_pictures(model, data, layer)
    return all(np.array_equal(np.asarray(Image.open(io.BytesIO(a))),
                              np.asarray(Image.open(io.BytesIO(b))))
               for a, b in zip(served, mine, strict=True))


def _rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (0 if unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


#: Layer whose Score-CAM the job runs use (112 channels: a few seconds per job on a CPU).
JOB_LAYER = "_blocks.10"


def _switch_while_jobs(port: int, seconds: float, shapes, conv) -> dict:
    """One client switches views while another keeps the job queue full of Score-CAMs."""
    stop = time.perf_counter() + seconds
    counts = {"accepted": 0, "refused": 0, "other": 0}
    ids: list[str] = []

    def feeder() -> None:
        client, target = Client(port), 0
        while time.perf_counter() < stop:
            status, body = client.raw("POST", "/api/jobs", {
                "image": IMAGE, "method": "scorecam", "layer": JOB_LAYER, "target": target})
            target += 1
            if status == 202:
                counts["accepted"] += 1
                ids.append(json.loads(body)["id"])
            elif status == 429:
                counts["refused"] += 1
            else:
                counts["other"] += 1
            time.sleep(0.25)

    thread = threading.Thread(target=feeder)
    thread.start()
    time.sleep(1.0)  # let the first job start
    work = Workload(Client(port), 7, shapes, conv)
    latencies: list[float] = []
    while time.perf_counter() < stop:
        latencies.append(work.step()[1])
    thread.join()
    client = Client(port)
    status = json.loads(client.get("/api/status"))["jobs"]
    for job_id in ids:  # cancel what still waits; the running one finishes
        client.raw("DELETE", f"/api/jobs/{job_id}")
    deadline = time.perf_counter() + 300
    while time.perf_counter() < deadline:
        jobs = json.loads(client.get("/api/status"))["jobs"]
        if jobs["running"] + jobs["waiting"] == 0:
            break
        time.sleep(0.5)
    return {"latencies": latencies, "counts": counts, "completed": status["completed"]}


def _soak(port: int, pid: int, seconds: float, shapes, conv) -> dict:
    """Mixed requests from 4 clients (uploads of new images, switches, CAMs, jobs) while
    the server's RSS is sampled; returns the samples and the request counts."""
    stop = time.perf_counter() + seconds
    lock = threading.Lock()
    recent: list[str] = [IMAGE]
    counts: dict[str, int] = {}
    errors: list[str] = []
    seed = [10_000]
    spatial = [name for name in LAYERS if len(shapes[name]) == 3]

    def count(kind: str) -> None:
        with lock:
            counts[kind] = counts.get(kind, 0) + 1

    def worker(index: int) -> None:
        client, rng = Client(port), random.Random(index)
        while time.perf_counter() < stop:
            roll = rng.random()
            try:
                if roll < 0.12:
                    with lock:
                        seed[0] += 1
                        data = _new_image_bytes(seed[0])
                    image_id = json.loads(client.request("POST", "/api/images", body=data))["id"]
                    client.get("/api/predict", image=image_id, layer=rng.choice(spatial))
                    with lock:
                        recent.append(image_id)
                        del recent[:-4]
                    count("upload + first view")
                    continue
                with lock:
                    image = rng.choice(recent)
                if roll < 0.22:
                    client.get("/api/cam.png", image=image, method="gradcam",
                               target=rng.randrange(1000))
                    count("gradcam")
                elif roll < 0.26:
                    status, _ = client.raw("POST", "/api/jobs", {
                        "image": image, "method": "fasterscorecam",
                        "target": rng.randrange(1000)})
                    count(f"job ({status})")
                else:
                    layer = rng.choice(spatial)
                    if rng.random() < 0.5:
                        layer_switch(client, layer, rng.choice(SETTINGS), image=image)
                    else:
                        channel_switch(client, layer, rng.randrange(shapes[layer][0]),
                                       "viridis", layer in conv, image=image)
                    count("switch")
            except Exception as error:
                with lock:
                    errors.append(str(error)[:200])

    samples: list[tuple[float, float]] = []
    start = time.perf_counter()

    def sampler() -> None:
        while time.perf_counter() < stop:
            samples.append((time.perf_counter() - start, _rss_mib(pid)))
            time.sleep(max(0.5, seconds / 60))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=sampler))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    samples.append((time.perf_counter() - start, _rss_mib(pid)))
    status = json.loads(Client(port).get("/api/status"))
    return {"samples": samples, "counts": counts, "errors": errors, "status": status}


def _cli_time(path: Path, layer: str, out: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "convscope", "activations", str(path), "--layer",
                    layer, "--channels", "64", "--out", str(out)], check=True,
                   capture_output=True)
    return time.perf_counter() - start


def run(quick: bool = False, soak: float | None = None, concurrency_only: bool = False,
        seconds: float | None = None) -> str:
    """The benchmark as markdown. ``concurrency_only``: sections 1 and 2 alone (one client,
    then 1 and 16 concurrent clients); ``seconds``: the 16-client duration (default 30, 8
    with ``quick``; one client runs a third of it)."""
    import torch

    from convscope.models import load_model

    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    server = subprocess.Popen([sys.executable, "-c", SERVER_CODE, str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.perf_counter() + 120
        while True:
            try:
                Client(port).get("/api/models")
                break
            except OSError:
                if time.perf_counter() > deadline or server.poll() is not None:
                    raise RuntimeError("server did not start: "
                                       + server.stderr.read().decode()[-2000:]) from None
                time.sleep(0.2)
        client = Client(port)
        table = json.loads(client.get("/api/layers"))
        shapes = {row["name"]: row["output_shape"] for row in table}
        conv = {row["name"] for row in table if row["conv"]}
        client.get("/api/predict", image=IMAGE)  # the one forward pass for this image
        for layer in LAYERS:  # warm-up: first render of each layer
            layer_switch(client, layer, SETTINGS[0])

        # 1. One client switching layers and channels on the cached image.
        work = Workload(client, 1, shapes, conv)
        single: dict[str, list[float]] = {"layer": [], "channel": []}
        steps = 60 if quick else 200
        t0 = time.perf_counter()
        for _ in range(steps):
            kind, elapsed = work.step()
            single[kind].append(elapsed)
        single_throughput = steps / (time.perf_counter() - t0)
        forwards_before = json.loads(client.get("/api/status"))["forward_passes"]

        # 2. 16 concurrent clients.
        seconds = seconds or (8.0 if quick else 30.0)
        one = _run_clients(port, 1, seconds / 3, shapes, conv, server.pid)
        many = _run_clients(port, 16, seconds, shapes, conv, server.pid)
        forwards_after = json.loads(client.get("/api/status"))["forward_passes"]
        if concurrency_only:
            return "\n".join(_switching_lines(shapes, forwards_after - forwards_before,
                                               single, steps, single_throughput, one, many))

        # 3. First view of a new image through the server.
        layer = "_blocks.3"
        reps = 3 if quick else 10
        server_times = [_first_view_server(client, _new_image_bytes(i + 1), layer)
                        for i in range(reps)]
        model = load_model("efficientnet_lite0", device="cpu")
        same = _same_pictures(client, model, layer)  # untimed: the baseline's pixels

        # 4. One client switching while Score-CAM jobs keep the queue full.
        jobs = _switch_while_jobs(port, 10.0 if quick else 40.0, shapes, conv)

        # 5. Memory soak with mixed requests.
        soak_seconds = soak if soak is not None else (20.0 if quick else 600.0)
        soaked = _soak(port, server.pid, soak_seconds, shapes, conv) if soak_seconds else None
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    # The same work through the library and the CLI, measured with the server stopped: an
    # idle server's OpenMP threads spin for a while and would slow this process down.
    _first_view_library(model, _new_image_bytes(99), layer)  # warm-up, as the server is
    _first_view_library(model, _new_image_bytes(98), layer, native=True)
    library_times, native_times = [], []
    for i in range(reps):  # alternated, so load drift hits both alike
        library_times.append(_first_view_library(model, _new_image_bytes(100 + i), layer))
        native_times.append(_first_view_library(model, _new_image_bytes(200 + i), layer,
                                                native=True))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "new.png"
        path.write_bytes(_new_image_bytes(999))
        cli_times = [_cli_time(path, layer, Path(tmp) / "out.png")]

    lines = _switching_lines(shapes, forwards_after - forwards_before, single, steps,
                             single_throughput, one, many)
    server_med, server_min = statistics.median(server_times), min(server_times)
    library_med, library_min = statistics.median(library_times), min(library_times)
    native_med, native_min = statistics.median(native_times), min(native_times)
    map_px = max(shapes[layer][1:])
    _, _, tile = _page_grid_layout(torch.empty(shapes[layer]))
    native_px, page_px = map_px, (tile // map_px) * map_px if tile >= map_px else tile
    cli_med = statistics.median(cli_times)
    lines += [
        "",
        f"| first view of a new image (upload, top-5, input, one layer grid), {reps} images | "
        "median s | best s | server / this (median) | server / this (best) |",
        "|---|---:|---:|---:|---:|",
        f"| server (HTTP; captures the shown layer, the rest on the first switch) | "
        f"{server_med:.3f} | "
        f"{server_min:.3f} | 1.00 | 1.00 |",
        f"| same work in-process with the library (one layer captured; the page's grid and "
        f"input drawn, PNG via Pillow; same pixels as the server's: "
        f"{'yes' if same else 'NO'}) | {library_med:.3f} | "
        f"{library_min:.3f} | {server_med / library_med:.2f}x | "
        f"{server_min / library_min:.2f}x |",
        f"| the same, grid at the activation's size ({native_px} px tiles, not the page's "
        f"{page_px}; the previous baseline) | {native_med:.3f} | {native_min:.3f} | "
        f"{server_med / native_med:.2f}x | {server_min / native_min:.2f}x |",
        f"| `convscope activations` CLI process (start, model load, same work) | {cli_med:.3f} | "
        f"{min(cli_times):.3f} | {server_med / cli_med:.2f}x | "
        f"{server_min / min(cli_times):.2f}x |",
        "",
        f"Goal: first view <= 1.3x the same work in-process (no process start or model "
        f"load): {server_med / library_med:.2f}x (median) and "
        f"{server_min / library_min:.2f}x (best) "
        f"({'yes' if max(server_med / library_med, server_min / library_min) <= 1.3 else 'NO'})"
        f"; a `convscope activations` process doing it takes {server_med / cli_med:.2f}x "
        "the server's time, model load included.",
    ]
    lines += _jobs_lines(jobs, single)
    if soaked is not None:
        lines += _soak_lines(soaked, soak_seconds)
    return "\n".join(lines)


def _switching_lines(shapes: dict, forwards: int, single: dict, steps: int,
                     single_throughput: float, one: dict, many: dict) -> list[str]:
    """Sections 1 and 2 as markdown: one client's latencies, then 1 against 16 clients."""
    import torch

    lines = [
        f"Server process on 127.0.0.1 ({_http_stack()}) with the pretrained "
        f"EfficientNet-Lite0 (224x224), {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} CPUs; image "
        f"`{IMAGE}` cached (the first view captures the shown layer, the first switch to "
        f"another layer captures all {len(shapes)}; "
        f"{forwards} further forward passes during the switching "
        "runs below).",
        "",
        "| one client, cached image | switches | p50 ms | p95 ms | p99 ms | goal |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for kind in ("layer", "channel"):
        p50, p95, p99 = _percentiles(single[kind])
        lines.append(f"| {kind} switch | {len(single[kind])} | {p50:.1f} | {p95:.1f} | "
                     f"{p99:.1f} | p95 < 100 ms: {'yes' if p95 < 100 else 'NO'} |")
    p50, p95, p99 = _percentiles(single["layer"] + single["channel"])
    lines.append(f"| all switches | {steps} | {p50:.1f} | {p95:.1f} | {p99:.1f} | "
                 f"{single_throughput:.1f} switches/s |")
    ratio = many["throughput"] / one["throughput"]
    lines += [
        "",
        "| concurrent clients | duration s | switches | errors | switches/s | p50 ms | "
        "p95 ms | p99 ms | server CPU ms/switch | cores used: server / clients / "
        "whole machine |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, result in (("1", one), ("16", many)):
        q50, q95, q99 = _percentiles(result["latencies"])
        lines.append(f"| {label} | {result['wall']:.0f} | {result['switches']} | "
                     f"{len(result['errors'])} | {result['throughput']:.1f} | {q50:.0f} | "
                     f"{q95:.0f} | {q99:.0f} | {result['server_ms']:.1f} | "
                     f"{result['server_cores']:.2f} / {result['client_cores']:.2f} / "
                     f"{result['machine_cores']:.2f} of {os.cpu_count()} |")
    lines += [
        "",
        f"16 clients vs 1: **{ratio:.2f}x** the throughput (goal >= 1.5x: "
        f"{'yes' if ratio >= 1.5 else 'NO'}), {len(many['errors'])} errors (goal 0).",
    ]
    if many["errors"]:
        lines.append(f"First error: `{many['errors'][0]}`")
    cores = os.cpu_count() or 1
    lines += [
        "",
        f"Where the time goes: the server process used {one['server_cores']:.2f} cores for one "
        f"client and {many['server_cores']:.2f} for 16, at "
        f"{one['server_ms']:.1f} / {many['server_ms']:.1f} ms of CPU per switch; the whole "
        f"machine was {one['machine_cores']:.2f} / {many['machine_cores']:.2f} of {cores} cores "
        "busy (other processes included). CPU alone would allow about "
        f"{1000 * cores / many['server_ms']:.0f} switches/s with all {cores} cores "
        f"({1000 * cores / many['server_ms'] / one['throughput']:.1f}x one client); where "
        "fewer are reached with cores to spare, the server is bound by work that holds the "
        "GIL: at most one switch's GIL-held share runs at a time, so 16 clients reach at "
        "most one client's time per switch divided by that share "
        f"(here {1000 / many['throughput']:.1f} ms per switch with 16 clients against "
        f"{1000 / one['throughput']:.1f} ms with one).",
    ]
    return lines


def _jobs_lines(jobs: dict, single: dict) -> list[str]:
    p50, p95, p99 = _percentiles(jobs["latencies"])
    q50, q95, _ = _percentiles(single["layer"] + single["channel"])
    counts = jobs["counts"]
    return [
        "",
        f"| one client switching while Score-CAM jobs ({JOB_LAYER}) keep the queue full | "
        "switches | p50 ms | p95 ms | p99 ms | goal |",
        "|---|---:|---:|---:|---:|---|",
        f"| with jobs running | {len(jobs['latencies'])} | {p50:.1f} | {p95:.1f} | {p99:.1f} | "
        f"p95 < 100 ms: {'yes' if p95 < 100 else 'NO'} |",
        f"| without jobs (above) | {len(single['layer']) + len(single['channel'])} | "
        f"{q50:.1f} | {q95:.1f} | | |",
        "",
        f"Job submissions: {counts['accepted']} accepted (202), {counts['refused']} refused "
        f"with 429 + Retry-After (queue full), {counts['other']} other answers; "
        f"{jobs['completed']} jobs finished during the run.",
    ]


def _soak_lines(soaked: dict, seconds: float) -> list[str]:
    samples = soaked["samples"]
    rss = [value for _, value in samples]
    half = len(rss) // 2
    first_half_max = max(rss[: max(1, half)])
    second = samples[half:]
    if len(second) >= 2:
        xs = [t for t, _ in second]
        ys = [v for _, v in second]
        mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
        slope = (sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
                 / max(sum((x - mean_x) ** 2 for x in xs), 1e-9)) * 60
    else:
        slope = 0.0
    flat = rss[-1] <= 1.1 * first_half_max
    caches = soaked["status"]["caches"]
    picks = [samples[round(i * (len(samples) - 1) / 6)] for i in range(7)]
    lines = [
        "",
        f"Soak: {seconds:.0f} s of mixed requests from 4 clients (uploads of new images with "
        "their first view, layer and channel switches, Grad-CAMs, Faster Score-CAM jobs): "
        + ", ".join(f"{n} {kind}" for kind, n in sorted(soaked["counts"].items()))
        + f"; {len(soaked['errors'])} errors"
        + (f" (first: `{soaked['errors'][0]}`)" if soaked["errors"] else "") + ".",
        "",
        "| time s | " + " | ".join(f"{t:.0f}" for t, _ in picks) + " |",
        "|---|" + "---:|" * len(picks),
        "| server RSS MiB | " + " | ".join(f"{v:.0f}" for _, v in picks) + " |",
        "",
        f"RSS: max {max(rss):.0f} MiB, end {rss[-1]:.0f} MiB, max of the first half "
        f"{first_half_max:.0f} MiB; slope over the second half {slope:+.1f} MiB/min. Flat "
        f"(end <= 1.1x the first half's max): {'yes' if flat else 'NO'}.",
        "",
        "| cache at the end | entries | bytes MiB | bound MiB |",
        "|---|---:|---:|---:|",
    ]
    for name, cache in caches.items():
        lines.append(f"| {name} | {cache['entries']} | {cache['bytes'] / 2**20:.1f} | "
                     f"{cache['max_bytes'] / 2**20:.0f} |")
    return lines


def _http_stack() -> str:
    """The HTTP parser and event loop uvicorn picks here ("auto": the C ones if installed)."""
    import importlib.util

    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"uvicorn {http} + {loop}"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="short runs: 60 single-client switches, 8 s with 16 clients, "
                             "3 first views, 10 s of jobs, a 20 s soak")
    parser.add_argument("--concurrency-only", action="store_true",
                        help="only the one-client latencies and the 1 vs 16 clients runs")
    parser.add_argument("--seconds", type=float, default=None,
                        help="16-client duration (default 30, 8 with --quick)")
    parser.add_argument("--soak", type=float, default=None, metavar="SECONDS",
                        help="soak duration (default 600, 20 with --quick; 0 skips it)")
    args = parser.parse_args(argv)
    print(run(quick=args.quick, soak=args.soak, concurrency_only=args.concurrency_only,
              seconds=args.seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
