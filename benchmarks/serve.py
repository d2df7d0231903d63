"""Serving under load: many viewers panning slides and chatting, against a plain tile loop.

``histopilot serve`` runs in its own process on 127.0.0.1 with the offline backend and the
shared slides. ``--clients`` (50) clients run for ``--duration`` (60 s). Each one is a person
at a viewer: a view change fetches ``--tiles-per-view`` (12) Deep Zoom tiles of a random slide
at random places and zoom levels, six at a time as a browser does, then the person looks for
``--think`` seconds (3 s on average; 0 makes a closed-loop stress test); every
``--views-per-turn`` (5) views they take a chat turn in their own thread (the first turn of a
thread runs the analysis; later ones ask about a region it cited). Reported: requests, errors,
p50/p95/p99 latency of tiles and of chat turns, and the server's resident memory over the run.

The peer is what a user would write without a server: OpenSlide's ``DeepZoomGenerator`` in a
loop in one process, JPEG-encoding the same tile addresses one after another; histopilot's own
tile service runs the same loop in-process beside it. The ratio is the
server's p50 tile latency under load over the peer's p50 per tile. The server runs with its
default tile cache (256 MB); ``--tile-cache-mb 0`` makes it decode every tile, as the peer does.
Viewers arrive over the first think interval and the first ``--warmup`` seconds (10) are
reported apart: cold caches, and every viewer's first chat turn running an analysis.

Targets: p95 tile latency < 100 ms, no errors, memory flat.

    python benchmarks/serve.py [--clients 50] [--duration 60] [--think 3.0]
                               [--tile-cache-mb 256] [--views-per-turn 5] [--json out]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import openslide
import psutil
from openslide.deepzoom import DeepZoomGenerator

from histopilot.serve.api.catalog import SlideCatalog
from histopilot.serve.api.tiles import TileService

DATA = Path(os.environ.get("HISTOPILOT_TEST_DATA", Path(__file__).parents[2] / "shared" / "data"))
SLIDES = ("CMU-1-Small-Region.svs", "tcga-cr-7395-01a-01-ts1.svs")
CHAT_SLIDE = "CMU-1-Small-Region.svs"  # declares its resolution, so the analysis can run
TILE_SIZE, OVERLAP = 254, 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(workdir: Path, tile_cache_mb: int) -> tuple[subprocess.Popen, str]:
    slides = workdir / "slides"
    slides.mkdir()
    for name in SLIDES:
        (slides / name).write_bytes((DATA / "wsi" / name).read_bytes())
    port = free_port()
    env = {
        **os.environ,
        "HISTOPILOT_AGENTS__FEATURE_CACHE": str(workdir / "features"),
        "HISTOPILOT_AGENTS__BUDGET": "4",
        "HISTOPILOT_AGENTS__TRAJECTORIES": "2",
        "HISTOPILOT_SERVER__TILE_CACHE_MB": str(tile_cache_mb),
        "HISTOPILOT_SERVER__RATE_LIMIT_PER_MINUTE": "1000000",
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "histopilot",
            "serve",
            "--port",
            str(port),
            "--slides",
            str(slides),
            "--data-dir",
            str(workdir / "data"),
        ],
        env=env,
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the server did not start")


def tile_addresses(seed: int, count: int) -> list[tuple[str, int, int, int]]:
    """Random (slide, level, column, row) addresses, weighted towards the deep levels a
    viewer spends its time in."""
    rng = random.Random(seed)
    pyramids = {}
    for name in SLIDES:
        with openslide.OpenSlide(DATA / "wsi" / name) as slide:
            generator = DeepZoomGenerator(slide, TILE_SIZE, OVERLAP, limit_bounds=False)
            pyramids[name] = generator.level_tiles
    addresses = []
    for _ in range(count):
        name = rng.choice(SLIDES)
        levels = pyramids[name]
        level = len(levels) - 1 - min(int(rng.expovariate(0.8)), len(levels) - 1)
        columns, rows = levels[level]
        addresses.append((name, level, rng.randrange(columns), rng.randrange(rows)))
    return addresses


def peer_latencies(addresses: list[tuple[str, int, int, int]]) -> list[float]:
    """OpenSlide's DeepZoomGenerator in a loop: get_tile and JPEG-encode, one at a time."""
    generators = {
        name: DeepZoomGenerator(
            openslide.OpenSlide(DATA / "wsi" / name), TILE_SIZE, OVERLAP, limit_bounds=False
        )
        for name in SLIDES
    }
    latencies = []
    for name, level, column, row in addresses:
        started = time.perf_counter()
        buffer = io.BytesIO()
        generators[name].get_tile(level, (column, row)).save(buffer, "JPEG", quality=80)
        latencies.append(time.perf_counter() - started)
    return latencies


def service_latencies(addresses: list[tuple[str, int, int, int]]) -> list[float]:
    """histopilot's tile service in this process, cache off, the same addresses in order."""
    with tempfile.TemporaryDirectory() as folder:
        catalog = SlideCatalog([DATA / "wsi"], Path(folder) / "uploads")
        entries = {slide.name: slide for slide in catalog.slides()}
        service = TileService(cache_bytes=0)
        latencies = []
        for name, level, column, row in addresses:
            started = time.perf_counter()
            service.tile(entries[name], level, column, row)
            latencies.append(time.perf_counter() - started)
        service.close()
    return latencies


async def viewer(
    client: aiohttp.ClientSession,
    ids: dict[str, str],
    addresses: list,
    stop_at: float,
    args: argparse.Namespace,
    results: dict,
    seed: int,
) -> None:
    rng = random.Random(seed)
    browser = asyncio.Semaphore(6)  # connections a browser opens per host
    thread, cited, views = None, None, 0

    async def fetch(address) -> None:
        name, level, column, row = address
        async with browser:
            url = f"/v1/slides/{ids[name]}/dzi_files/{level}/{column}_{row}.jpeg"
            await timed(client.get(url), results, "tile")

    await asyncio.sleep(rng.uniform(0, args.think))  # people do not all arrive at once
    while time.monotonic() < stop_at:
        await asyncio.gather(*(fetch(rng.choice(addresses)) for _ in range(args.tiles_per_view)))
        views += 1
        if views % args.views_per_turn == 0 and time.monotonic() < stop_at:
            text = f"Tell me about {cited}" if cited else "What do you see on this slide?"
            metadata = {"slide": ids[CHAT_SLIDE], **({"thread_id": thread} if thread else {})}
            response = await timed(
                client.post(
                    "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": text}], "metadata": metadata},
                ),
                results,
                "chat",
            )
            if response is not None:
                extras = response["histopilot"]
                thread = extras["thread_id"]
                cited = extras["citations"][0]["region_id"] if extras["citations"] else cited
        await asyncio.sleep(args.think * rng.uniform(0.5, 1.5))


async def timed(request, results: dict, kind: str) -> dict | None:
    """Await ``request``; record its latency (body read included) or its error."""
    started = time.perf_counter()
    try:
        async with request as response:
            body = await response.read()
    except (aiohttp.ClientError, TimeoutError) as error:
        results["errors"].append(f"{kind}: {type(error).__name__}")
        return None
    results[kind].append((started, time.perf_counter() - started))
    if response.status != 200:
        results["errors"].append(f"{kind}: HTTP {response.status} {body[:120]!r}")
        return None
    return json.loads(body) if kind == "chat" else {}


async def load(url: str, args: argparse.Namespace, addresses: list) -> dict:
    results: dict = {"tile": [], "chat": [], "errors": [], "began": time.perf_counter()}
    connector = aiohttp.TCPConnector(limit=0)  # each viewer limits itself, as browsers do
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as client:
        async with client.get("/v1/slides") as response:
            listing = (await response.json())["data"]
        ids = {slide["name"]: slide["id"] for slide in listing}
        stop_at = time.monotonic() + args.duration
        await asyncio.gather(
            *(
                viewer(client, ids, addresses, stop_at, args, results, seed)
                for seed in range(args.clients)
            )
        )
    return results


def sample_memory(process: psutil.Process, samples: list, stop: list) -> None:
    while not stop:
        samples.append(process.memory_info().rss / 1e6)
        time.sleep(2)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ms = np.array(values) * 1000
    return {
        "n": len(values),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--tiles-per-view", type=int, default=12)
    parser.add_argument("--views-per-turn", type=int, default=5)
    parser.add_argument("--think", type=float, default=3.0)
    parser.add_argument("--tile-cache-mb", type=int, default=256)
    parser.add_argument(
        "--warmup", type=float, default=10.0, help="Seconds reported apart: viewers arriving."
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    addresses = tile_addresses(seed=0, count=2000)
    peer = peer_latencies(addresses[:500])
    in_process = service_latencies(addresses[:500])
    with tempfile.TemporaryDirectory() as folder:
        process, url = start_server(Path(folder), args.tile_cache_mb)
        try:
            server = psutil.Process(process.pid)
            memory: list[float] = []
            stop: list[bool] = []
            sampler = threading.Thread(target=sample_memory, args=(server, memory, stop))
            sampler.start()
            started = time.perf_counter()
            server_cpu = sum(server.cpu_times()[:2])
            own_cpu = sum(psutil.Process().cpu_times()[:2])
            results = asyncio.run(load(url, args, addresses))
            elapsed = time.perf_counter() - started
            server_cpu = sum(server.cpu_times()[:2]) - server_cpu
            own_cpu = sum(psutil.Process().cpu_times()[:2]) - own_cpu
            stop.append(True)
            sampler.join()
        finally:
            process.terminate()
            process.wait(timeout=30)

    steady_from = results["began"] + args.warmup

    def split(kind: str) -> tuple[list[float], list[float]]:
        timed = results[kind]
        return (
            [latency for at, latency in timed if at < steady_from],
            [latency for at, latency in timed if at >= steady_from],
        )

    (tiles_warmup, tiles_steady), (chats_warmup, chats_steady) = split("tile"), split("chat")
    tiles, chats, peer_stats = (
        percentiles(tiles_steady),
        percentiles(chats_steady),
        percentiles(peer),
    )
    third = max(1, len(memory) // 3)
    summary = {
        "clients": args.clients,
        "think_s": args.think,
        "seconds": round(elapsed, 1),
        "tile_cache_mb": args.tile_cache_mb,
        "warmup_s": args.warmup,
        "requests": len(results["tile"]) + len(results["chat"]),
        "errors": len(results["errors"]),
        "error_examples": sorted(set(results["errors"]))[:5],
        "tiles": tiles,
        "tiles_during_warmup": percentiles(tiles_warmup),
        "tiles_per_s": round(len(results["tile"]) / elapsed, 1),
        "cpu_cores_used": {
            "server": round(server_cpu / elapsed, 2),
            "load_generator": round(own_cpu / elapsed, 2),
        },
        "chat_turns": chats,
        "chat_turns_during_warmup": percentiles(chats_warmup),
        "peer_openslide_loop": peer_stats,
        "histopilot_tiles_in_process": percentiles(in_process),
        "p50_ratio_server_over_peer": round(tiles["p50_ms"] / peer_stats["p50_ms"], 2),
        "memory_mb": {
            "first_third_mean": round(float(np.mean(memory[:third])), 1),
            "last_third_mean": round(float(np.mean(memory[-third:])), 1),
            "max": round(max(memory), 1),
            "every_10_s": [round(value) for value in memory[::5]],
        },
    }
    print(json.dumps(summary, indent=2))
    print(
        f"\nafter {args.warmup:.0f} s of warm-up: "
        f"tiles p50 {tiles['p50_ms']} ms, p95 {tiles['p95_ms']} ms under {args.clients} "
        f"clients ({summary['tiles_per_s']} tiles/s); OpenSlide loop p50 {peer_stats['p50_ms']} "
        f"ms per tile: ratio {summary['p50_ratio_server_over_peer']}x (histopilot's tile service "
        f"in-process: p50 {summary['histopilot_tiles_in_process']['p50_ms']} ms). chat turns: p50 "
        f"{chats.get('p50_ms')} ms, p95 {chats.get('p95_ms')} ms. errors: {summary['errors']}. "
        f"target p95 < 100 ms: {'met' if tiles['p95_ms'] < 100 else 'missed'}."
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
