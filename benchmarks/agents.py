"""The agent graph's costs: orchestration overhead, end-to-end time, regions vs exhaustive.

1. **Overhead per graph step.** The trajectory loop (navigate → describe → diagnose) with
   instant nodes that carry a real analysis's state, through LangGraph with a checkpointer
   (in memory and SQLite), against the same three functions called in a plain Python loop
   (the peer: no framework, no persistence). Target: under 20 ms per step.
2. **Orchestration share of an offline run.** One serial trajectory on a real slide: wall time
   against the time spent inside the nodes themselves.
3. **End to end.** ``histopilot demo`` and ``histopilot analyze`` on the shared slides as
   subprocesses (cold: empty embedding cache; warm: cached), wall time and peak memory.
4. **Regions read vs an exhaustive pass.** Regions the agents examined against the tissue
   tiles an exhaustive pass describes, and the time such a pass takes with the same describer
   (the peer: PathFinder's "exhaustive" ablation, SlideSeek's ~1,000 tiles vs ~47 regions).

Run from the repository root (needs ../shared/data or HISTOPILOT_TEST_DATA):

    python benchmarks/agents.py [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from langgraph.graph import END, START, StateGraph
from langgraph.types import Command

from histopilot.agents.checkpoints import open_checkpointer
from histopilot.agents.describe import describe_region
from histopilot.agents.state import Region, TrajectoryState
from tests.agent_helpers import analyse, make_context

DATA = Path(os.environ.get("HISTOPILOT_TEST_DATA", Path(__file__).parents[2] / "shared" / "data"))
SLIDES = {
    "CMU-1-Small-Region.svs": None,
    # Declares no µm/px; nuclei ~7 px across put it at about 1 µm/px.
    "tcga-cr-7395-01a-01-ts1.svs": 1.0,
}


def overhead_per_step(state: dict, steps: int) -> tuple[float, float, float]:
    """ms per navigate→describe→diagnose step: LangGraph (memory, SQLite) and a plain loop."""

    def navigate(s: TrajectoryState) -> dict:
        return {"step": s.get("step", 0) + 1}

    def describe(s: TrajectoryState) -> dict:
        return {"pending": []}

    def diagnose(s: TrajectoryState) -> Command:
        return Command(goto=END if s["step"] >= steps else "navigate", update={})

    builder = StateGraph(TrajectoryState)
    builder.add_node("navigate", navigate)
    builder.add_node("describe", describe)
    builder.add_node("diagnose", diagnose, destinations=("navigate", END))
    builder.add_edge(START, "navigate")
    builder.add_edge("navigate", "describe")
    builder.add_edge("describe", "diagnose")
    start_state = {key: state[key] for key in ("slide", "regions", "findings", "evidence")}
    start_state |= {"step": 0, "trajectory": 1, "seed": 0}
    times = []
    with tempfile.TemporaryDirectory() as folder:
        for spec in ("memory", str(Path(folder) / "bench.sqlite")):
            with open_checkpointer(spec, Path(folder) / "unused.sqlite") as saver:
                graph = builder.compile(checkpointer=saver)
                config = {"configurable": {"thread_id": spec}, "recursion_limit": 4 * steps + 10}
                begin = time.perf_counter()
                graph.invoke(start_state, config)
                times.append((time.perf_counter() - begin) / steps * 1000)
    plain = dict(start_state)
    begin = time.perf_counter()
    while True:
        plain |= navigate(plain)
        plain |= describe(plain)
        if diagnose(plain).goto == END:
            break
    times.append((time.perf_counter() - begin) / steps * 1000)
    return times[0], times[1], times[2]


def orchestration_share(slide: Path, cache: Path) -> tuple[float, float, int]:
    """Wall time and time inside nodes of one serial trajectory (warm embedding cache)."""
    context = make_context(cache, trajectories=1, regions_per_step=1, budget=10)
    run = analyse(slide, context)
    timings = run.state["timings"]
    inside = sum(seconds for name, seconds in timings.items() if name != "trajectory_wall")
    return run.seconds, inside, len(run.state["regions"])


#: Runs the CLI in a child and prints the child's own peak resident memory (KiB) last.
CHILD = """
import resource, sys
from histopilot.cli import main
sys.argv = ["histopilot", *sys.argv[1:]]
try:
    main()
finally:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def end_to_end(args: list[str], env: dict) -> tuple[float, float, dict]:
    """Seconds, peak resident MiB of the command's process, and its JSON summary."""
    begin = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    seconds = time.perf_counter() - begin
    peak_kib = int(done.stderr.strip().splitlines()[-1])
    return seconds, peak_kib / 1024, json.loads(done.stdout)


def exhaustive_pass(slide: Path, mpp: float | None, cache: Path) -> tuple[int, float]:
    """Describe every tissue tile at high power with the offline describer: (tiles, s)."""
    context = make_context(cache, slide_mpp=mpp)
    workspace = context.workspace(slide)
    maps = workspace.maps
    size = maps.tile_size
    ref = workspace.ref()
    begin = time.perf_counter()
    for i, (x, y) in enumerate(maps.features.coords):
        region = Region(
            id=f"E{i}",
            x=int(x),
            y=int(y),
            width=size,
            height=size,
            magnification="high",
            mpp=maps.features.mpp,
            trajectory=0,
            step=0,
        )
        describe_region(context, ref, region)
    return len(maps.features.coords), time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    options = parser.parse_args()
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        cache = work / "features"
        env = os.environ | {
            "HISTOPILOT_AGENTS__FEATURE_CACHE": str(cache),
            "XDG_CONFIG_HOME": str(work / "config"),
        }
        wsi = DATA / "wsi"

        print(f"## End to end ({cores} cores, offline backend, default settings)\n")
        begin = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "histopilot", "--version"],
            env=env,
            check=True,
            capture_output=True,
        )
        startup = time.perf_counter() - begin
        print(f"(`histopilot --version`, i.e. interpreter start and imports: {startup:.1f} s)\n")
        print("| run | cache | wall s | peak MiB | regions | tissue tiles | regions/tiles |")
        print("|---|---|---|---|---|---|---|")
        runs = [("demo", ["demo", "--out"], None)]
        runs += [(name, ["analyze", str(wsi / name), "--out"], mpp) for name, mpp in SLIDES.items()]
        for label, command, mpp in runs:
            # The demo builds a new slide file each time, so its embeddings are never cached.
            for cache_state in ("cold",) if label == "demo" else ("cold", "warm"):
                out = work / f"{label}-{cache_state}"
                extra = ["--mpp", str(mpp)] if mpp else []
                seconds, peak, summary = end_to_end([*command, str(out), *extra], env)
                print(
                    f"| {label} | {cache_state} | {seconds:.1f} | {peak:.0f} | "
                    f"{summary['regions']} | {summary['tissue_tiles']} | "
                    f"{summary['regions'] / max(summary['tissue_tiles'], 1):.2f} |"
                )

        print("\n## Regions read vs an exhaustive high-power pass (same offline describer)\n")
        print("| slide | agents: regions, s | exhaustive: tiles, s | time ratio |")
        print("|---|---|---|---|")
        for name, mpp in SLIDES.items():
            context = make_context(cache, slide_mpp=mpp, budget=12, trajectories=3)
            run = analyse(wsi / name, context)
            tiles, seconds = exhaustive_pass(wsi / name, mpp, cache)
            agents_s = run.seconds
            print(
                f"| {name} | {len(run.state['regions'])}, {agents_s:.1f} | {tiles}, "
                f"{seconds:.1f} | {seconds / agents_s:.1f}x |"
            )

        slide = wsi / "CMU-1-Small-Region.svs"
        state = analyse(slide, make_context(cache, budget=12, trajectories=3)).state
        memory, sqlite, plain = overhead_per_step(state, options.steps)
        print(
            f"\n## Orchestration overhead per step ({options.steps} steps, real state: "
            f"{len(state['regions'])} regions, {len(state['findings'])} findings)\n"
        )
        print("| loop | ms/step | vs plain Python |")
        print("|---|---|---|")
        print(f"| LangGraph + InMemorySaver | {memory:.2f} | {memory / plain:.0f}x |")
        print(f"| LangGraph + SqliteSaver | {sqlite:.2f} | {sqlite / plain:.0f}x |")
        print(f"| plain Python loop (peer) | {plain:.4f} | 1x |")

        wall, inside, regions = orchestration_share(slide, cache)
        print(
            f"\nOne serial trajectory ({regions} regions): wall {wall:.2f} s, inside nodes "
            f"{inside:.2f} s, orchestration {(wall - inside) / wall:.1%} of the run."
        )
        medians = statistics.median([memory, sqlite])
        print(f"Target < 20 ms/step: {'met' if medians < 20 else 'missed'}.")


if __name__ == "__main__":
    main()
