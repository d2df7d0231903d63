"""The ``histopilot`` command line: one Typer app whose sub-commands mirror the subpackages.

Every command that reports data takes ``--json``; every error a user can cause is printed as
one line on stderr, without a traceback, with exit code 2.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, ParamSpec, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table

from histopilot import __version__
from histopilot.config import ROLE_NAMES, HistopilotConfig, available_profiles, load_config
from histopilot.errors import HistopilotError, ImageInputError, OutputError
from histopilot.privacy import configure_logging, uvicorn_log_config
from histopilot.serve.vllm_launch import LaunchPlan, VLLMServer, plan_servers, run_servers
from histopilot.slide import Slide, SlideInfo, detect_tissue, open_slide
from histopilot.slide.demo import build_demo_slide
from histopilot.slide.render import draw_tissue_outline, save_png
from histopilot.slide.tiling import TileGrid, iter_tiles, tile_grid
from histopilot.storage import atomic_file
from histopilot.tools.images import GENERATED_NOTICE
from histopilot.tools.report.document import EXTRACTION_NOTICE
from histopilot.tools.report.render import ReportFormat
from histopilot.tools.report.schemas import SCHEMA_ALIASES, SCHEMAS

if TYPE_CHECKING:
    from histopilot.finetune.recipe import RunResult

app = typer.Typer(
    name="histopilot",
    help="Open multi-agent pathology assistant: slides, reports, structured extraction.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
slide_app = typer.Typer(help="Whole-slide images: info, tissue, tiles, thumbnails.")
app.add_typer(slide_app, name="slide", no_args_is_help=True)
index_app = typer.Typer(help="Patch indexes for similar-tissue search: build, add, remove.")
app.add_typer(index_app, name="index", no_args_is_help=True)
kb_app = typer.Typer(help="Knowledge bases of ontologies, tumour trees and documents.")
app.add_typer(kb_app, name="kb", no_args_is_help=True)
stain_app = typer.Typer(help="Stain normalization and augmentation of tiles and slides.")
app.add_typer(stain_app, name="stain", no_args_is_help=True)
diffusion_app = typer.Typer(help="Diffusion edits of tiles: stain transfer, counterfactuals.")
app.add_typer(diffusion_app, name="diffusion", no_args_is_help=True)
finetune_app = typer.Typer(help="Training recipes.")
app.add_typer(finetune_app, name="finetune", no_args_is_help=True)
report_app = typer.Typer(help="Synoptic reports: render as Markdown, HTML, JSON or FHIR; schemas.")
app.add_typer(report_app, name="report", no_args_is_help=True)
eval_app = typer.Typer(
    help="Quality evaluations: every capability scored on a labelled set, with tables, plots "
    "and a run card."
)
app.add_typer(eval_app, name="eval", no_args_is_help=True)

stderr = Console(stderr=True)
P = ParamSpec("P")
R = TypeVar("R")

SlidePath = Annotated[Path, typer.Argument(help="Slide file (SVS, NDPI, DICOM, TIFF, …).")]
SlideMPP = Annotated[
    float | None,
    typer.Option(
        "--slide-mpp",
        "--mpp",
        help="Scan resolution in µm/px, for files that do not declare it (or declare it wrong).",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
ConfigPath = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar="HISTOPILOT_CONFIG",
        help="Config file (default: ./histopilot.toml, then the user config folder).",
    ),
]
Profile = Annotated[
    str | None,
    typer.Option(
        "--profile",
        envvar="HISTOPILOT_PROFILE",
        help=f"Built-in profile under the config file: {', '.join(available_profiles())}.",
    ),
]


def reports_user_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Print a ``HistopilotError`` as one red line and exit 2, instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except HistopilotError as error:
            stderr.print(
                f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(code=2) from None

    return wrapper


def _print_json(data: BaseModel | dict) -> None:
    text = (
        data.model_dump_json(indent=2)
        if isinstance(data, BaseModel)
        else json.dumps(data, indent=2)
    )
    sys.stdout.write(text + "\n")


def _progress() -> Progress:
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
    )


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log details (identifiers still redacted).")
    ] = False,
) -> None:
    # Every command logs through the redacting filter: logs never hold patient identifiers.
    configure_logging(logging.INFO if verbose else logging.WARNING)
    if version:
        sys.stdout.write(f"histopilot {__version__}\n")
        raise typer.Exit


# -- slide ----------------------------------------------------------------------------------
@slide_app.command("info")
@reports_user_errors
def slide_info(path: SlidePath, slide_mpp: SlideMPP = None, as_json: AsJson = False) -> None:
    """Dimensions, pyramid levels, resolution, vendor and associated images of a slide."""
    with open_slide(path, mpp=slide_mpp) as slide:
        info = slide.info
    if as_json:
        _print_json(info)
    else:
        _print_info(info)


def _print_info(info: SlideInfo) -> None:
    console = Console()
    table = Table(title=info.name, show_header=False, title_justify="left")
    mpp = f"{info.mpp.x:.4f} x {info.mpp.y:.4f} µm/px ({info.mpp.source})" if info.mpp else None
    rows = {
        "format": f"{info.format} (read with {info.reader})",
        "size": f"{info.width} x {info.height} px",
        "resolution": mpp or f"[yellow]unknown[/] — {info.mpp_note}",
        "objective": f"{info.objective_power:g}x" if info.objective_power else "not declared",
        "modality": f"{info.modality} ({', '.join(info.channels)})",
        "associated": ", ".join(info.associated_images) or "none",
    }
    for key, value in rows.items():
        table.add_row(key, value)
    for level in info.levels:
        level_mpp = f", {level.mpp:.3f} µm/px" if level.mpp else ""
        table.add_row(
            f"level {level.index}",
            f"{level.width} x {level.height} (x{level.downsample:.2f}{level_mpp})",
        )
    for note in info.notes:
        table.add_row("note", note)
    console.print(table)


@slide_app.command("tissue")
@reports_user_errors
def slide_tissue(
    path: SlidePath,
    out: Annotated[Path, typer.Option("--out", help="Tissue mask PNG (white = tissue).")],
    geojson: Annotated[
        Path | None, typer.Option("--geojson", help="Tissue polygons, level-0 pixels.")
    ] = None,
    slide_mpp: SlideMPP = None,
    as_json: AsJson = False,
) -> None:
    """Detect tissue (pen marks excluded); write a mask PNG and optionally GeoJSON polygons."""
    with open_slide(path, mpp=slide_mpp) as slide:
        tissue = detect_tissue(slide)
        save_png(tissue.mask, out)
        mpp = slide.mpp.mean if slide.mpp else None
        if geojson is not None:
            _write_text(geojson, json.dumps(tissue.to_geojson(mpp)))
    summary = {
        "slide": str(path),
        "mask": str(out),
        "geojson": str(geojson) if geojson else None,
        "mask_downsample": tissue.downsample,
        "tissue_fraction": tissue.tissue_fraction,
        "pen_fraction": tissue.pen_fraction,
        "regions": len(tissue.polygons),
        "tissue_area_mm2": sum(p.area_px for p in tissue.polygons) * mpp**2 / 1e6 if mpp else None,
    }
    if as_json:
        _print_json(summary)
    else:
        stderr.print(
            f"tissue {summary['tissue_fraction']:.1%} of the slide in {summary['regions']} "
            f"region(s), pen marks {summary['pen_fraction']:.1%}; mask → {out}"
        )


@slide_app.command("thumbnail")
@reports_user_errors
def slide_thumbnail(
    path: SlidePath,
    out: Annotated[Path, typer.Option("--out", help="Output PNG.")],
    size: Annotated[int, typer.Option("--size", min=16, max=8192, help="Longest side, px.")] = 1024,
    outline: Annotated[
        bool, typer.Option("--outline/--no-outline", help="Draw the tissue outline.")
    ] = True,
    slide_mpp: SlideMPP = None,
) -> None:
    """A thumbnail of the whole slide, with the detected tissue outlined."""
    with open_slide(path, mpp=slide_mpp) as slide:
        overview, downsample = slide.overview(max_size=size)
        if outline and slide.modality == "brightfield":
            overview = draw_tissue_outline(overview, detect_tissue(slide), downsample)
    save_png(overview, out)
    stderr.print(f"thumbnail {overview.shape[1]}x{overview.shape[0]} → {out}")


@slide_app.command("tiles")
@reports_user_errors
def slide_tiles(
    path: SlidePath,
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    mpp: Annotated[float, typer.Option("--mpp", help="Tile resolution in µm/px.")] = 0.5,
    size: Annotated[int, typer.Option("--size", help="Tile side in pixels.")] = 256,
    overlap: Annotated[int, typer.Option("--overlap", help="Pixels shared by neighbours.")] = 0,
    min_tissue: Annotated[
        float, typer.Option("--min-tissue", help="Minimum tissue fraction of a kept tile.")
    ] = 0.5,
    save_images: Annotated[
        bool, typer.Option("--save-images", help="Also write every tile as PNG.")
    ] = False,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Reader threads.")] = None,
    slide_mpp: Annotated[
        float | None, typer.Option("--slide-mpp", help="Scan resolution (µm/px) if undeclared.")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Tile the tissue at a target resolution; write coordinates (HDF5) and optionally PNGs."""
    name = _output_name(path)
    with open_slide(path, mpp=slide_mpp) as slide:
        grid = tile_grid(slide, mpp=mpp, tile_size=size, overlap=overlap, min_tissue=min_tissue)
        coords_path = grid.save_h5(out / f"{name}.h5")
        tile_dir = out / name
        if save_images:
            _save_tile_images(slide, grid, tile_dir, workers)
    summary = {
        "slide": str(path),
        "tiles": len(grid),
        "tile_size": size,
        "target_mpp": mpp,
        "read_level": grid.read_level,
        "tile_size_level0": grid.size_level0,
        "coords": str(coords_path),
        "images": str(tile_dir) if save_images else None,
    }
    if as_json:
        _print_json(summary)
    else:
        stderr.print(
            f"{len(grid)} tiles of {size} px at {mpp} µm/px (read from level "
            f"{grid.read_level}); coordinates → {coords_path}"
        )


def _output_name(slide_path: Path) -> str:
    """A file-name-safe stem for outputs, so ``.``, ``..`` or a folder never escape ``--out``."""
    resolved = slide_path.resolve()
    stem = resolved.stem if resolved.is_file() else resolved.name
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip(".")
    return safe or "slide"


def _save_tile_images(slide: Slide, grid: TileGrid, folder: Path, workers: int | None) -> None:
    with _progress() as progress:
        task = progress.add_task("tiles", total=len(grid))
        for batch in iter_tiles(slide, grid, workers=workers):
            for image, (x, y) in zip(batch.images, batch.coords, strict=True):
                save_png(image, folder / f"x{x}_y{y}.png")
            progress.advance(task, len(batch.indices))


def _write_text(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from error


# -- analysis -------------------------------------------------------------------------------
#: Written first into every analysis folder; its presence marks a folder analyze may reuse.
CHECKPOINTS_FILE = "checkpoints.sqlite"
Question = Annotated[
    str | None, typer.Option("--question", "-q", help="What to look for or answer.")
]
Budget = Annotated[
    int | None, typer.Option("--budget", min=1, help="Regions per trajectory, at most.")
]
Trajectories = Annotated[
    int | None, typer.Option("--trajectories", min=1, help="Seeded trajectories that vote.")
]
Seed = Annotated[
    int | None, typer.Option("--seed", help="Navigation seed (same seed, same regions).")
]
Thread = Annotated[
    str | None, typer.Option("--thread", help="Thread id: resumes that thread when it exists.")
]
ReferenceBank = Annotated[
    Path | None,
    typer.Option("--reference", help="Labelled patch index for k-NN evidence (`index images`)."),
]
Knowledge = Annotated[
    Path | None, typer.Option("--knowledge", help="Knowledge base folder (`kb build`).")
]
Stain = Annotated[
    str | None,
    typer.Option(
        "--stain",
        help="The slide's stain: he, ihc, or the immunostain's markers (ER, 'ER,PR'); by default "
        "estimated from colour. Only a declared marker makes its result reportable.",
    ),
]


@app.command("analyze")
@reports_user_errors
def analyze(
    slide_path: SlidePath,
    question: Question = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default: <slide>-analysis).")
    ] = None,
    budget: Budget = None,
    trajectories: Trajectories = None,
    seed: Seed = None,
    review: Annotated[
        bool, typer.Option("--review", help="Pause for your approval before the report is final.")
    ] = False,
    thread: Thread = None,
    reference: ReferenceBank = None,
    knowledge: Knowledge = None,
    stain: Stain = None,
    slide_mpp: SlideMPP = None,
    config: ConfigPath = None,
    profile: Profile = None,
    as_json: AsJson = False,
) -> None:
    """Read a slide with the agents; write report.md, analysis.json, overlay.png,
    regions.geojson (QuPath-compatible) and audit.json."""
    from histopilot.storage import check_new_output_folder

    out = out or Path(f"{_output_name(slide_path)}-analysis")
    if thread is None:  # a new thread; an existing one resumes in its own folder
        check_new_output_folder(out, what="analysis", replaceable_marker=CHECKPOINTS_FILE)
    overrides = {
        "budget": budget,
        "trajectories": trajectories,
        "seed": seed,
        "review": review or None,
        "stain": stain,
        **_resource_overrides(reference, knowledge),
    }
    _analyze_into(
        slide_path,
        out,
        load_config(config, profile=profile),
        overrides,
        question,
        thread,
        slide_mpp,
        as_json,
    )


def _analyze_into(
    slide_path: Path,
    out: Path,
    config: HistopilotConfig,
    overrides: dict,
    question: str | None,
    thread: str | None,
    slide_mpp: float | None,
    as_json: bool,
    extra: dict | None = None,
) -> None:
    from histopilot.agents.checkpoints import open_checkpointer
    from histopilot.agents.outputs import write_outputs
    from histopilot.agents.run import new_thread_id, run_analysis

    context = _agent_context(slide_path, config, slide_mpp, overrides)
    thread = thread or new_thread_id()
    stderr.print(f"thread {thread} (resume it with --thread {thread})", highlight=False)
    try:
        with open_checkpointer(
            context.settings.checkpoints, out / CHECKPOINTS_FILE
        ) as checkpointer:
            run = run_analysis(
                slide_path,
                context,
                checkpointer,
                question=question,
                thread_id=thread,
                on_progress=lambda line: stderr.print(f"[dim]{escape(line)}[/]", highlight=False),
                on_review=_ask_reviewer,
            )
        files = write_outputs(
            run.state,
            context.workspace(run.state["slide"]),
            out,
            thread_id=run.thread_id,
            audit=run.audit,
        )
    finally:
        context.close()
    diagnosis, report = run.state["diagnosis"], run.state["report"]
    summary = {
        "thread_id": run.thread_id,
        "seconds": round(run.seconds, 2),
        "assessment": report.diagnosis,
        "confidence": diagnosis.confidence,
        "regions": len(run.state.get("regions", {})),
        "tissue_tiles": run.state["triage"].tiles,
        "outputs": files.model_dump(),
        "notice": run.state["report"].notice,
        **(extra or {}),
    }
    if as_json:
        _print_json(summary)
        return
    stderr.print(escape(report.diagnosis), highlight=False, soft_wrap=True)
    stderr.print(
        f"{summary['regions']} regions examined (an exhaustive pass: {summary['tissue_tiles']} "
        f"tiles) in {summary['seconds']} s; thread {run.thread_id}. Outputs in {out}/",
        highlight=False,
    )
    stderr.print(f"[bold]{escape(summary['notice'])}[/]", highlight=False)


def _resource_overrides(reference: Path | None, knowledge: Path | None) -> dict:
    return {
        "reference_bank": reference and str(reference),
        "knowledge_base": knowledge and str(knowledge),
    }


def _agent_context(slide_path: Path, config: HistopilotConfig, slide_mpp, overrides: dict):
    """The agents' context for one slide, after checking the slide is there (before any model
    or index loads)."""
    from histopilot.agents.context import AgentContext

    if not slide_path.exists():
        raise HistopilotError(f"no slide at {slide_path}.")
    return AgentContext.from_config(config, slide_mpp=slide_mpp, **overrides)


@app.command("audit")
@reports_user_errors
def audit(
    thread: Annotated[
        str,
        typer.Argument(
            help="A thread or analysis id, or an analysis folder (`analyze --out`).",
            show_default=False,
        ),
    ],
    checkpoints: Annotated[
        str | None,
        typer.Option(
            "--checkpoints",
            help="Where the thread persists: a SQLite file or a postgresql:// URL (default: "
            "agents.checkpoints, else the chat threads file; a server keeps its threads in "
            "<data_dir>/threads.sqlite).",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the JSON here.")] = None,
    config: ConfigPath = None,
    profile: Profile = None,
    as_json: AsJson = False,
) -> None:
    """What an analysis or a chat thread ran: models and revisions, adapters, prompt versions,
    tools with their inputs and outputs, regions, timings, config hash, guardrail actions."""
    from histopilot.agents.audit import AuditLog, AuditTrail
    from histopilot.agents.checkpoints import open_checkpointer

    store, thread_id = _audit_source(thread, checkpoints, load_config(config, profile=profile))
    if not store.startswith(("postgres://", "postgresql://")) and not Path(store).is_file():
        raise HistopilotError(f"no checkpoint database at {store}; name it with --checkpoints.")
    with open_checkpointer(store) as checkpointer:
        trail = AuditTrail(records=AuditLog(checkpointer).records(thread_id))
    if not trail.records:
        raise HistopilotError(
            f"no audit records for {thread_id!r} in {store}; name the store with --checkpoints."
        )
    if out is not None:
        _write_text(out, trail.model_dump_json(indent=2))
    if as_json:
        _print_json(trail)
        return
    console = Console()
    for record in trail.records:
        models = ", ".join(
            f"{m.role}={m.model or m.backend}" + (f"@{m.revision}" if m.revision else "")
            for m in record.provenance.models
        )
        console.print(
            f"[bold]{escape(record.id)}[/] {record.kind}, "
            f"{record.started:%Y-%m-%d %H:%M:%S} UTC, {record.seconds:.1f} s\n"
            f"  models: {escape(models)}\n"
            f"  {len(record.tool_calls)} tool calls, {len(record.model_calls)} model calls, "
            f"{len(record.regions)} regions, {len(record.guardrails)} statements withheld",
            highlight=False,
            soft_wrap=True,
        )
    first = trail.records[0].provenance
    stderr.print(
        f"config {first.config_hash}, histopilot {first.histopilot}, prompts "
        + ", ".join(f"{name}@{digest}" for name, digest in first.prompts.items())
        + (f"; data leaves this machine for {', '.join(first.remote)}" if first.remote else ""),
        highlight=False,
    )


def _audit_source(thread: str, checkpoints: str | None, config: HistopilotConfig):
    """The checkpoint store and thread id that ``histopilot audit THREAD`` names."""
    import platformdirs

    folder = Path(thread)
    if folder.is_dir():
        record = folder / "analysis.json"
        if not record.is_file():
            raise HistopilotError(f"{folder} holds no analysis.json; is it an analysis folder?")
        try:
            thread_id = json.loads(record.read_text(encoding="utf-8"))["thread_id"]
        except (ValueError, KeyError) as error:
            raise HistopilotError(f"{record} is not an analysis record ({error}).") from None
        store = checkpoints or config.agents.checkpoints or str(folder / CHECKPOINTS_FILE)
        return store, thread_id
    default = Path(platformdirs.user_data_dir("histopilot")) / "threads.sqlite"
    return checkpoints or config.agents.checkpoints or str(default), thread


def _ask_reviewer(payload: dict) -> dict:
    """Show the draft and ask the person at the terminal to approve or return it."""
    report = payload["report"]
    stderr.print(f"[bold]{escape(report['title'])}[/]\n{escape(report['diagnosis'])}")
    for statement in report["findings"]:
        stderr.print(f"  - {escape(statement['text'])}", highlight=False)
    approve = typer.confirm("Approve this draft?", default=False, err=True)
    note = typer.prompt("Note for the record", default="", show_default=False, err=True)
    return {"approve": approve, "note": note}


@app.command("chat")
@reports_user_errors
def chat(
    slide_path: SlidePath,
    thread: Thread = None,
    reference: ReferenceBank = None,
    knowledge: Knowledge = None,
    stain: Stain = None,
    slide_mpp: SlideMPP = None,
    config: ConfigPath = None,
    profile: Profile = None,
) -> None:
    """Chat with a slide in the terminal; the thread resumes across runs with --thread.

    Commands: /analyze [question], /describe REGION, /regions, /report, /help, /quit.
    Questions go to the orchestrator model (see `histopilot models`); offline, they are
    answered from the slide's analysis.
    """
    import platformdirs

    from histopilot.agents.chat import ChatSession
    from histopilot.agents.checkpoints import open_checkpointer

    context = _agent_context(
        slide_path,
        load_config(config, profile=profile),
        slide_mpp,
        {"stain": stain, **_resource_overrides(reference, knowledge)},
    )
    default_store = Path(platformdirs.user_data_dir("histopilot")) / "threads.sqlite"
    console = Console()
    try:
        with open_checkpointer(context.settings.checkpoints, default_store) as checkpointer:
            session = ChatSession(context, slide_path, checkpointer, thread_id=thread)
            console.print(
                f"histopilot chat on {escape(slide_path.name)} (thread {session.thread_id}; "
                "/help for commands). Answers are drafts for pathologist review, not diagnoses.",
                highlight=False,
            )
            _chat_loop(session, console)
    finally:
        context.close()


def _chat_loop(session, console: Console) -> None:
    def show_progress(event) -> None:
        if event.kind == "progress":
            stderr.print(f"[dim]{escape(event.text)}[/]", highlight=False)

    while True:
        try:
            line = console.input("[bold]you>[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if line in ("/quit", "/exit"):
            break
        if not line:
            continue
        try:
            reply = session.turn(line, show_progress)
        except HistopilotError as error:
            console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
            continue
        console.print(f"[bold]histopilot>[/] {escape(reply.text)}", highlight=False)


# -- demo -----------------------------------------------------------------------------------
@app.command("demo")
@reports_user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("histopilot-demo"),
    as_json: AsJson = False,
) -> None:
    """Run the full offline analysis on the built-in demo slide (no GPU, no downloads).

    Builds the demo slide, then writes report.md, analysis.json, overlay.png and
    regions.geojson, as `histopilot analyze` does for any slide.
    """
    from histopilot.storage import check_new_output_folder

    check_new_output_folder(out, what="demo", replaceable_marker=CHECKPOINTS_FILE)
    slide_path = build_demo_slide(out / "demo-slide.tif")
    config = HistopilotConfig()  # the embedded default (offline), whatever is configured
    note = "demo slide: a mosaic of one real IHC field from scikit-image, for demonstration"
    _analyze_into(
        slide_path,
        out,
        config,
        {"checkpoints": str(out / CHECKPOINTS_FILE)},
        None,
        None,
        None,
        as_json,
        extra={"slide": str(slide_path), "note": note},
    )


def _write_json(path: Path, model: BaseModel) -> Path:
    _write_text(path, model.model_dump_json(indent=2))
    return path


# -- models ---------------------------------------------------------------------------------
@app.command("models")
@reports_user_errors
def models(config: ConfigPath = None, profile: Profile = None, as_json: AsJson = False) -> None:
    """The resolved model configuration: each role's backend and model, and the encoders."""
    resolved = load_config(config, profile=profile)
    if as_json:
        _print_json(resolved)
        return
    table = Table(title=f"profile: {resolved.profile}", title_justify="left")
    for column in ("role", "backend", "model", "adapter", "served at"):
        table.add_column(column, overflow="fold")
    for role in ROLE_NAMES:
        settings = resolved.roles[role]
        offline = settings.backend == "offline"
        table.add_row(
            role,
            settings.backend,
            "(deterministic strategies)" if offline else settings.model,
            settings.adapter or "",
            settings.base_url or ("in this process" if not offline else ""),
        )
    console = Console()
    console.print(table)
    console.print(f"patch encoder: {resolved.encoders.patch}")
    console.print(f"knowledge-base embedder: {resolved.encoders.kb_embedder}")
    console.print("from: " + " + ".join(resolved.sources), highlight=False)


@app.command("serve-llm")
@reports_user_errors
def serve_llm(
    config: ConfigPath = None,
    profile: Profile = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the vllm serve commands; start nothing.")
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Start the vLLM servers the configured 'openai' roles talk to, and wait until ready."""
    resolved = load_config(config, profile=profile)
    plan = plan_servers(resolved)
    if dry_run:
        _print_json(plan) if as_json else _print_plan(plan, resolved)
        return
    _print_plan(plan, resolved, to=stderr)
    code = run_servers(
        plan.servers,
        startup_timeout_s=resolved.vllm.startup_timeout_s,
        api_key=_served_api_key(plan, resolved),
        on_ready=_announce_ready,
    )
    raise typer.Exit(code=code)


def _print_plan(plan: LaunchPlan, config: HistopilotConfig, to: Console | None = None) -> None:
    console = to or Console(highlight=False, soft_wrap=True)
    for server in plan.servers:
        console.print(f"# roles {', '.join(server.roles)} → {server.model}", highlight=False)
        for note in server.notes:
            console.print(f"# note: {note}", highlight=False)
        console.print(server.shell_command(), highlight=False, markup=False)
    for role, url in plan.remote.items():
        console.print(f"# role {role} is served by another machine ({url})", highlight=False)
    if not plan.servers and not plan.remote:
        console.print(f"# no role uses the 'openai' backend in profile '{config.profile}'")


def _announce_ready(server: VLLMServer) -> None:
    stderr.print(
        f"ready: {server.model} for {', '.join(server.roles)} at "
        f"http://{server.host}:{server.port}/v1",
        highlight=False,
    )


def _served_api_key(plan: LaunchPlan, config: HistopilotConfig) -> str | None:
    """The key the local servers should demand: the one their roles will send."""
    served = {role for server in plan.servers for role in server.roles}
    names = {config.roles[role].api_key_env for role in served}
    keys = {os.environ[name] for name in names if os.environ.get(name)}
    if len(keys) > 1:
        raise HistopilotError(
            "roles served here name different API keys; one server accepts one key"
        )
    return keys.pop() if keys else None


# -- HTTP server ------------------------------------------------------------------------------
@app.command("serve")
@reports_user_errors
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    slides: Annotated[
        list[Path] | None,
        typer.Option("--slides", help="A folder of slides to serve (repeat for more)."),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Threads, analyses and uploads (default: user data)."),
    ] = None,
    config: ConfigPath = None,
    profile: Profile = None,
) -> None:
    """Serve the web viewer with chat, the slide tiles, the agents (an OpenAI-compatible chat
    endpoint) and extraction over HTTP; the API is documented at /docs."""
    import platformdirs
    import uvicorn

    from histopilot.serve.api.app import create_app
    from histopilot.serve.api.security import is_loopback

    resolved = load_config(config, profile=profile)
    server = resolved.server
    if not server.tokens and not is_loopback(host):
        raise HistopilotError(
            f"refusing to serve on {host} without authentication: add tokens under "
            '[server.tokens] in histopilot.toml (user = "<token>"), or bind to 127.0.0.1.'
        )
    data = (
        data_dir
        or Path(server.data_dir or Path(platformdirs.user_data_dir("histopilot")) / "server")
    ).expanduser()
    roots = [Path(root).expanduser() for root in [*server.slide_roots, *(slides or [])]]
    if not roots:
        demo = data / "demo"
        if not (demo / "demo-slide.tif").exists():
            build_demo_slide(demo / "demo-slide.tif")
        roots = [demo]
        stderr.print(
            "no --slides given: serving the built-in demo slide (uploads are accepted too).",
            highlight=False,
        )
    if server.tokens:
        stderr.print(f"authentication on: {len(server.tokens)} token(s)", highlight=False)
    else:
        stderr.print(
            escape(
                f"authentication off: bound to loopback {host} (add [server.tokens] to serve "
                "other hosts)"
            ),
            highlight=False,
        )
    stderr.print(f"histopilot at http://{host}:{port}/ (API docs at /docs)", highlight=False)
    uvicorn.run(
        create_app(resolved, slide_roots=roots, data_dir=data),
        host=host,
        port=port,
        log_level="info",
        log_config=uvicorn_log_config(),  # access lines show slide names: redacted too
        timeout_graceful_shutdown=5,
    )


# -- index and search -----------------------------------------------------------------------
IndexPath = Annotated[Path, typer.Argument(help="Index folder.")]
Slides = Annotated[list[Path], typer.Argument(help="Slide files to embed and index.")]
EncoderName = Annotated[
    str | None,
    typer.Option("--encoder", help="Patch encoder (default: [encoders] patch in the config)."),
]
Device = Annotated[
    str | None, typer.Option("--device", help="cpu, cuda or cuda:N (default: auto).")
]
Label = Annotated[
    str | None, typer.Option("--label", help="Label stored with every patch of these slides.")
]


Shards = Annotated[
    int,
    typer.Option(
        "--shards",
        min=1,
        help="Split the search structure into shards, searched in parallel (one per GPU "
        "when there are several).",
    ),
]


@index_app.command("build")
@reports_user_errors
def index_build(
    slides: Slides,
    out: Annotated[Path, typer.Option("--out", help="New index folder.")],
    encoder: EncoderName = None,
    kind: Annotated[
        str, typer.Option("--kind", help="flat (exact), hnsw or ivfpq (large collections).")
    ] = "flat",
    shards: Shards = 1,
    label: Label = None,
    slide_mpp: SlideMPP = None,
    device: Device = None,
    config: ConfigPath = None,
    as_json: AsJson = False,
) -> None:
    """Embed the tissue tiles of SLIDES and index them for similar-patch and slide search."""
    from histopilot.retrieval.patch_index import PatchIndex
    from histopilot.retrieval.vectors import checked_kind
    from histopilot.storage import atomic_directory, check_new_output_folder

    checked_kind(kind)  # before the encoder loads, which can take a while
    check_new_output_folder(out, what="patch index", replaceable_marker=None)
    patch_encoder = _patch_encoder(encoder, device, config)
    # Built aside and moved into place at the end: a failed build leaves nothing behind.
    with atomic_directory(out) as building:
        index = PatchIndex.create(
            building, encoder=patch_encoder.name, dim=patch_encoder.dim, kind=kind, shards=shards
        )
        added = _index_slides(index, patch_encoder, slides, label, slide_mpp)
    _report_indexed(out, patch_encoder.name, added, len(index), as_json)


@index_app.command("images")
@reports_user_errors
def index_images(
    folder: Annotated[Path, typer.Argument(help="Folder of labelled patch images.")],
    out: Annotated[Path, typer.Option("--out", help="New index folder.")],
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="CSV with file,label[,label_name,mpp] (default: FOLDER/labels.csv, else the "
            "file-name prefix before '-' or '_').",
        ),
    ] = None,
    image_mpp: Annotated[
        float | None, typer.Option("--mpp", help="µm/px of the images, when the CSV has none.")
    ] = None,
    encoder: EncoderName = None,
    device: Device = None,
    config: ConfigPath = None,
    as_json: AsJson = False,
) -> None:
    """Index labelled patch images as a reference bank for the agents' k-NN evidence."""
    from histopilot.retrieval.patch_index import PatchIndex
    from histopilot.retrieval.reference import add_labelled_images, read_labels
    from histopilot.storage import atomic_directory, check_new_output_folder

    images = read_labels(folder, labels)
    if not images:
        raise HistopilotError(f"no patch images in {folder}.")
    check_new_output_folder(out, what="reference bank", replaceable_marker=None)
    patch_encoder = _patch_encoder(encoder, device, config)
    with atomic_directory(out) as building, _progress() as progress:
        index = PatchIndex.create(building, encoder=patch_encoder.name, dim=patch_encoder.dim)
        task = progress.add_task(folder.name, total=len(images))
        add_labelled_images(
            index,
            patch_encoder,
            images,
            mpp=image_mpp,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
        labels_found = {label: count for label, _, count in index.labels()}
    summary = {
        "index": str(out),
        "encoder": patch_encoder.name,
        "patches": len(images),
        "labels": labels_found,
    }
    _report(summary, as_json, f"indexed {len(images)} labelled patches {labels_found} → {out}")


@index_app.command("add")
@reports_user_errors
def index_add(
    index_path: IndexPath,
    slides: Slides,
    label: Label = None,
    slide_mpp: SlideMPP = None,
    device: Device = None,
    as_json: AsJson = False,
) -> None:
    """Add SLIDES to an index (a slide already there is replaced), with its own encoder."""
    from histopilot.retrieval.encoders import load_encoder
    from histopilot.retrieval.patch_index import PatchIndex

    index = PatchIndex.open(index_path)
    patch_encoder = load_encoder(index.encoder, device=device)
    added = _index_slides(index, patch_encoder, slides, label, slide_mpp)
    _report_indexed(index_path, patch_encoder.name, added, len(index), as_json)


@index_app.command("remove")
@reports_user_errors
def index_remove(
    index_path: IndexPath,
    slide_ids: Annotated[list[str], typer.Argument(help="Slide ids (file names without suffix).")],
    as_json: AsJson = False,
) -> None:
    """Remove every patch of the given slides."""
    from histopilot.retrieval.patch_index import PatchIndex

    index = PatchIndex.open(index_path)
    removed = index.remove_slides(slide_ids)
    _report({"removed": removed, "patches": len(index)}, as_json, f"{removed}; {len(index)} left")


@index_app.command("rebuild")
@reports_user_errors
def index_rebuild(
    index_path: IndexPath,
    kind: Annotated[str | None, typer.Option("--kind", help="Switch to another kind.")] = None,
    shards: Annotated[
        int | None, typer.Option("--shards", min=1, help="Split into this many shards.")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Rebuild the search structure from the metadata table (repairs an interrupted write)."""
    from histopilot.retrieval.patch_index import PatchIndex

    index = PatchIndex.open(index_path, check=False)
    index.rebuild(kind, shards)
    info = index.info()
    _report(info, as_json, f"rebuilt {index_path}: {len(index)} patches ({info['kind']})")


@index_app.command("info")
@reports_user_errors
def index_info(index_path: IndexPath, as_json: AsJson = False) -> None:
    """The index's encoder, kind, size and slides."""
    from histopilot.retrieval.patch_index import PatchIndex

    info = PatchIndex.open(index_path).info()
    slides = ", ".join(f"{s['slide_id']} ({s['patches']})" for s in info["slides"])
    _report(info, as_json, f"{info['count']} patches, {info['encoder']}, {info['kind']}: {slides}")


def _patch_encoder(name: str | None, device: str | None, config: Path | None):
    from histopilot.retrieval.encoders import load_encoder

    return load_encoder(name or load_config(config).encoders.patch, device=device)


def _index_slides(index, encoder, slides, label, slide_mpp) -> dict[str, int]:
    """Embed each slide (cached in the index's ``features`` folder) and add it."""
    from histopilot.retrieval.features import embed_slide

    added = {}
    with _progress() as progress:
        for path in slides:
            task = progress.add_task(path.name, total=None)

            def advance(done: int, total: int, task=task) -> None:
                progress.update(task, completed=done, total=total)

            with open_slide(path, mpp=slide_mpp) as slide:
                features = embed_slide(
                    slide, encoder, cache_dir=index.path / "features", progress=advance
                )
            added[features.slide_id] = index.add_slide(features, label=label)
    return added


def _report_indexed(
    index_path: Path, encoder: str, added: dict[str, int], patches: int, as_json: bool
) -> None:
    summary = {"index": str(index_path), "encoder": encoder, "added": added, "patches": patches}
    _report(summary, as_json, f"indexed {added} → {index_path}")


def _report(data: dict, as_json: bool, line: str) -> None:
    if as_json:
        _print_json(data)
    else:
        stderr.print(line, highlight=False, soft_wrap=True)


@app.command("search")
@reports_user_errors
def search(
    index_path: IndexPath,
    image: Annotated[Path | None, typer.Option("--image", help="Query image file.")] = None,
    slide_path: Annotated[Path | None, typer.Option("--slide", help="Query slide.")] = None,
    region: Annotated[
        str | None, typer.Option("--region", help="x,y,w,h (level 0) of --slide to match.")
    ] = None,
    text: Annotated[str | None, typer.Option("--text", help="Describe the tissue.")] = None,
    k: Annotated[int, typer.Option("-k", min=1, max=1000, help="Results to return.")] = 10,
    slide_mpp: SlideMPP = None,
    device: Device = None,
    as_json: AsJson = False,
) -> None:
    """Similar patches to an image, a slide region or a text; similar slides to a slide."""
    from pydantic import ValidationError

    from histopilot.retrieval.encoders import load_encoder
    from histopilot.retrieval.features import embed_slide
    from histopilot.retrieval.patch_index import PatchIndex
    from histopilot.retrieval.search import PatchQuery, query_vectors, search_patches, search_slides

    by_slide = slide_path is not None and region is None
    if not by_slide:
        try:
            query = PatchQuery(
                image_path=image and str(image),
                slide_path=slide_path and str(slide_path),
                region=_parse_region(region) if region else None,
                text=text,
                k=k,
            )
        except ValidationError as error:
            reason = error.errors()[0]["msg"].removeprefix("Value error, ")
            raise HistopilotError(
                f"{reason} (--image, --slide with --region, or --text)."
            ) from None
    elif image is not None or text is not None:
        raise HistopilotError(
            "give exactly one query: --image, --slide (with or without --region) or --text."
        )
    index = PatchIndex.open(index_path)
    index.require_entries()
    encoder = load_encoder(index.encoder, device=device)
    if by_slide:
        with open_slide(slide_path, mpp=slide_mpp) as slide:
            features = embed_slide(slide, encoder)
        slides = search_slides(index, features, k=k)
        _print_hits({"query": str(slide_path), "slides": [s.model_dump() for s in slides]}, as_json)
        return
    hits = search_patches(index, query_vectors(query, encoder, slide_mpp=slide_mpp), k)
    _print_hits({"patches": [hit.model_dump() for hit in hits]}, as_json)


def _parse_region(text: str) -> tuple[int, int, int, int]:
    try:
        x, y, width, height = (int(part) for part in text.split(","))
    except ValueError:
        raise HistopilotError(f"--region takes x,y,w,h in level-0 pixels, got {text!r}.") from None
    return x, y, width, height


def _print_hits(result: dict, as_json: bool) -> None:
    if as_json:
        _print_json(result)
        return
    rows = result.get("patches") or result.get("slides") or []
    table = Table(title_justify="left")
    columns = (
        ("rank", "score", "slide_id", "x", "y", "label")
        if "patches" in result
        else ("rank", "slide_id", "votes", "median_similarity", "label")
    )
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_cell(row[c]) for c in columns))
    Console().print(table)


def _cell(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "" if value is None else str(value)


# -- stain ----------------------------------------------------------------------------------
StainInputs = Annotated[
    list[Path], typer.Argument(help="Image files, folders of tiles, or slides (tissue tiles).")
]
StainOut = Annotated[Path, typer.Option("--out", help="Output folder.")]
TileSize = Annotated[int, typer.Option("--tile-size", help="Tile side for slide inputs (px).")]
TileMPP = Annotated[float, typer.Option("--tile-mpp", help="Tile resolution for slides (µm/px).")]
MaxTiles = Annotated[
    int | None, typer.Option("--max-tiles", min=1, help="At most this many tiles per slide.")
]
Device = Annotated[str, typer.Option("--device", help="torch device: cpu, cuda, cuda:1, …")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Tiles per batch.")]


@stain_app.command("fit")
@reports_user_errors
def stain_fit(
    references: Annotated[list[Path], typer.Argument(help="Reference images (or folders).")],
    out: Annotated[Path, typer.Option("--out", help="Target file to write (JSON).")],
    method: Annotated[str, typer.Option("--method", help="macenko, vahadane or reinhard.")] = (
        "macenko"
    ),
    as_json: AsJson = False,
) -> None:
    """Fit a stain target to one or more reference images and save it."""
    from histopilot.tools.images import list_images, read_rgb
    from histopilot.tools.stain import StainNormalizer

    images = [read_rgb(path) for path in list_images(references)]
    target = StainNormalizer.fit(images, method).save(out)
    _report(
        _target_summary(out), as_json, f"{method} target from {len(images)} image(s) → {target}"
    )


def _target_summary(path: Path) -> dict:
    from histopilot.tools.stain import StainTarget

    return {"target": str(path), **StainTarget.load(path).model_dump()}


@stain_app.command("normalize")
@reports_user_errors
def stain_normalize(
    inputs: StainInputs,
    out: StainOut,
    target: Annotated[
        list[Path],
        typer.Option("--target", help="Reference image(s), or a target saved by `stain fit`."),
    ],
    method: Annotated[
        str | None, typer.Option("--method", help="macenko (default), vahadane or reinhard.")
    ] = None,
    tile_size: TileSize = 512,
    tile_mpp: TileMPP = 0.5,
    max_tiles: MaxTiles = None,
    device: Device = "cpu",
    batch_size: BatchSize = 64,
    as_json: AsJson = False,
) -> None:
    """Normalize tiles toward a target; tiles that cannot be normalized are copied, flagged."""
    from histopilot.tools.images import list_images, read_rgb
    from histopilot.tools.stain import StainNormalizer
    from histopilot.tools.stain.files import (
        SlideTiling,
        iter_inputs,
        process_files,
        write_manifest,
    )

    if len(target) == 1 and target[0].suffix.lower() == ".json":
        normalizer = StainNormalizer.load(target[0], device=device)
        if method and method != normalizer.method:
            raise HistopilotError(
                f"{target[0]} is a {normalizer.method} target; drop --method or refit it"
            )
    else:
        references = [read_rgb(path) for path in list_images(target)]
        normalizer = StainNormalizer.fit(references, method or "macenko", device=device)
    tiles = iter_inputs(inputs, SlideTiling(tile_size, tile_mpp, max_tiles=max_tiles))
    with _progress() as progress:
        task = progress.add_task("normalize", total=None)
        rows = process_files(
            tiles,
            normalizer.transform,
            out,
            batch_size=batch_size,
            on_tile=lambda: progress.advance(task),
        )
    flags = write_manifest(out, rows)
    normalizer.save(out / "target.json")
    _report_stain(flags, out, as_json, f"{normalizer.method}-normalized")


@stain_app.command("augment")
@reports_user_errors
def stain_augment(
    inputs: StainInputs,
    out: StainOut,
    method: Annotated[str, typer.Option("--method", help="hed or macenko.")] = "hed",
    copies: Annotated[int, typer.Option("--copies", min=1, help="Variants per tile.")] = 1,
    scale: Annotated[
        float, typer.Option("--scale", help="Stain amounts vary by up to ± this fraction.")
    ] = 0.05,
    shift: Annotated[float, typer.Option("--shift", help="Stain offsets up to ± this OD.")] = 0.05,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed; same seed, same output.")] = 0,
    tile_size: TileSize = 512,
    tile_mpp: TileMPP = 0.5,
    max_tiles: MaxTiles = None,
    device: Device = "cpu",
    batch_size: BatchSize = 64,
    as_json: AsJson = False,
) -> None:
    """Write randomly re-stained copies of tiles, for training."""
    from histopilot.tools.stain import Jitter
    from histopilot.tools.stain.files import (
        SlideTiling,
        augment_with,
        iter_inputs,
        process_files,
        write_manifest,
    )

    jitter = Jitter(scale=scale, shift=shift)
    tiling = SlideTiling(tile_size, tile_mpp, max_tiles=max_tiles)
    rows = []
    with _progress() as progress:
        task = progress.add_task("augment", total=None)
        for copy in range(copies):
            rows += process_files(
                iter_inputs(inputs, tiling),
                augment_with(method, jitter, seed=seed, copy=copy, device=device),
                out,
                batch_size=batch_size,
                suffix=f"_aug{copy}",
                on_tile=lambda: progress.advance(task),
            )
    flags = write_manifest(out, rows)
    _report_stain(flags, out, as_json, f"{method}-augmented")


def _report_stain(flags: dict[str, int], out: Path, as_json: bool, done: str) -> None:
    summary = {"out": str(out), "tiles": sum(flags.values()), "flags": dict(flags)}
    unchanged = ", ".join(
        f"{count} {flag}"
        for flag, count in sorted(flags.items())
        if count and flag not in ("normalized", "augmented")
    )
    line = f"{summary['tiles']} tiles → {out} ({done}" + (
        f"; unchanged: {unchanged})" if unchanged else ")"
    )
    _report(summary, as_json, line)


# -- diffusion and fine-tuning ----------------------------------------------------------------
ModelFolder = Annotated[
    Path, typer.Option("--model", help="Diffusion model folder (`finetune diffusion`).")
]
Steps = Annotated[int, typer.Option("--steps", min=1, help="DDIM steps.")]


RecipeFile = Annotated[
    str, typer.Option("--config", help="Recipe: a YAML file, or a shipped recipe's name.")
]
RecipeOut = Annotated[Path | None, typer.Option("--out", help="Override the recipe's out.")]
RecipeSet = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override one field, e.g. --set train.steps=50 (repeatable)."),
]
Resume = Annotated[
    bool, typer.Option("--resume/--restart", help="Continue from the last checkpoint.")
]


def _recipe(kind, config: str, out: Path | None, overrides: list[str] | None):
    """Load a recipe, apply --out and --set, and print what will run."""
    recipe = kind.load(config, overrides or (), out=out)
    stderr.print(escape(recipe.effective()), highlight=False)
    return recipe


def _train_progress(progress: Progress, total: int):
    task = progress.add_task("training", total=total)

    def advance(step: int, of: int, loss: float) -> None:
        progress.update(task, completed=step, total=of, description=f"loss {loss:.4f}")

    return advance


def _train(train: Callable[..., R], recipe, total: int, **options) -> R:
    """Run a recipe with a progress bar, printing what it announces (its memory estimate)."""
    with _progress() as progress:
        return train(
            recipe, on_progress=_train_progress(progress, total), announce=_announce, **options
        )


def _report_run(result: RunResult, as_json: bool, line: str) -> None:
    from histopilot.finetune.recipe import loss_summary

    summary = result.model_dump(mode="json", exclude={"losses"}) | loss_summary(result.losses)
    _report(summary, as_json, escape(line))


def _announce(line: str) -> None:
    stderr.print(line, highlight=False)


@finetune_app.command("recipes")
@reports_user_errors
def finetune_recipes(as_json: AsJson = False) -> None:
    """List the recipes shipped with histopilot (pass a name to --config)."""
    from histopilot.finetune.recipe import shipped_recipes

    recipes = shipped_recipes()
    if as_json:
        _print_json(recipes)
        return
    for name, description in recipes.items():
        stderr.print(f"[bold]{name}[/]  {escape(description)}", highlight=False)


@finetune_app.command("vlm")
@reports_user_errors
def finetune_vlm(
    config: RecipeFile,
    out: RecipeOut = None,
    overrides: RecipeSet = None,
    resume: Resume = True,
    as_json: AsJson = False,
) -> None:
    """LoRA fine-tuning of a vision-language model (TRL SFT); writes a vLLM-servable adapter."""
    from histopilot.finetune.vlm import VLMRecipe, train_vlm

    recipe = _recipe(VLMRecipe, config, out, overrides)
    result = _train(train_vlm, recipe, recipe.train.steps or 0, resume=resume)
    _report_run(
        result,
        as_json,
        f"{result.steps} steps; adapter → {result.adapter}; eval {result.eval_before} → "
        f"{result.eval_after}; {result.skipped} records skipped\n"
        f"Serve it: add to histopilot.toml\n{result.serve_config}",
    )


@finetune_app.command("clip")
@reports_user_errors
def finetune_clip(
    config: RecipeFile, out: RecipeOut = None, overrides: RecipeSet = None, as_json: AsJson = False
) -> None:
    """Contrastive fine-tuning of an open_clip model (LoRA or full); recall before and after."""
    from histopilot.finetune.clip import ClipRecipe, train_clip

    recipe = _recipe(ClipRecipe, config, out, overrides)
    result = _train(train_clip, recipe, recipe.train.steps)
    _report_run(
        result,
        as_json,
        f"model → {result.model}\nbefore: {result.before}\nafter:  {result.after}\n"
        f'Use it: [encoders] patch = "{result.encoder}"',
    )


@finetune_app.command("mil")
@reports_user_errors
def finetune_mil(
    config: RecipeFile, out: RecipeOut = None, overrides: RecipeSet = None, as_json: AsJson = False
) -> None:
    """Train the attention-MIL triage head on slide features; AUC on validation slides."""
    from histopilot.finetune.mil import MILRecipe, train_mil

    recipe = _recipe(MILRecipe, config, out, overrides)
    result = _train(train_mil, recipe, recipe.train.epochs)
    _report_run(
        result,
        as_json,
        f"head → {result.head} (epoch {result.best_epoch}); validation {result.validation} "
        f"(chance {result.chance}); risk = P({' or '.join(result.risk_classes)})\n"
        f"Use it: add to histopilot.toml\n{result.agents_config}",
    )


@finetune_app.command("diffusion")
@reports_user_errors
def finetune_diffusion(
    config: RecipeFile,
    out: RecipeOut = None,
    overrides: RecipeSet = None,
    resume: Resume = True,
    as_json: AsJson = False,
) -> None:
    """Train the conditional tile diffusion model (EMA, checkpoints, sample grids, resume)."""
    from histopilot.finetune.diffusion import DiffusionRecipe, train_diffusion

    recipe = _recipe(DiffusionRecipe, config, out, overrides)
    result = _train(train_diffusion, recipe, recipe.train.steps, resume=resume)
    _report_run(result, as_json, f"{result.steps} steps; model → {result.model}")


@finetune_app.command("convert")
@reports_user_errors
def finetune_convert(
    source: Annotated[Path, typer.Argument(help="LLaVA JSON, a table, or analyses folder.")],
    fmt: Annotated[str, typer.Option("--from", help="llava | vqa | captions | analyses.")],
    out: Annotated[Path, typer.Option("--out", help="Dataset folder to write.")],
    image_root: Annotated[
        Path | None, typer.Option("--images", help="Folder image paths are relative to.")
    ] = None,
    image_column: Annotated[str, typer.Option(help="Table column naming the image.")] = "image",
    question_column: Annotated[str, typer.Option(help="VQA question column.")] = "question",
    answer_column: Annotated[str, typer.Option(help="VQA answer column.")] = "answer",
    caption_column: Annotated[str, typer.Option(help="Caption column.")] = "caption",
    prompt: Annotated[str | None, typer.Option(help="Question asked of each caption.")] = None,
    include_drafts: Annotated[
        bool, typer.Option(help="Analyses: also use reports nobody reviewed.")
    ] = False,
    slides: Annotated[
        Path | None, typer.Option("--slides", help="Analyses: folder the slides moved to.")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Convert training data into histopilot's conversation dataset (with a skip report)."""
    from histopilot.finetune.converters import DESCRIBE_PROMPT, convert

    if fmt not in ("llava", "vqa", "captions", "analyses"):
        raise typer.BadParameter("--from takes llava, vqa, captions or analyses")
    report = convert(
        source,
        out,
        fmt,  # type: ignore[arg-type]
        image_root=image_root,
        image_column=image_column,
        question_column=question_column,
        answer_column=answer_column,
        caption_column=caption_column,
        prompt=prompt or DESCRIBE_PROMPT,
        include_drafts=include_drafts,
        slide_root=slides,
    )
    summary = report.model_dump(mode="json") | {"by_reason": report.by_reason, "out": str(out)}
    _report(summary, as_json, f"{report.summary()} → {out} (details in {out}/skipped.json)")


@finetune_app.command("export")
@reports_user_errors
def finetune_export(
    dataset: Annotated[Path, typer.Argument(help="Conversation dataset folder or .jsonl.")],
    fmt: Annotated[str, typer.Option("--to", help="llava | vqa | captions.")],
    out: Annotated[Path, typer.Option("--out", help="File to write (.json or .csv).")],
    as_json: AsJson = False,
) -> None:
    """Write a conversation dataset as LLaVA JSON, a VQA table or a caption table."""
    from histopilot.finetune.conversations import read_conversations
    from histopilot.finetune.converters import export_dataset

    if fmt not in ("llava", "vqa", "captions"):
        raise typer.BadParameter("--to takes llava, vqa or captions")
    conversations, report, root = read_conversations(dataset)
    rows = export_dataset(conversations, root, fmt, out)  # type: ignore[arg-type]
    summary = {"rows": rows, "out": str(out), "skipped": len(report.skipped)}
    _report(summary, as_json, f"{rows} rows → {out}; {report.summary()}")


@diffusion_app.command("transfer")
@reports_user_errors
def diffusion_transfer(
    inputs: StainInputs,
    out: StainOut,
    model: ModelFolder,
    source: Annotated[str, typer.Option("--source", help="The tiles' condition now.")],
    target: Annotated[str, typer.Option("--target", help="The condition to move them to.")],
    method: Annotated[str, typer.Option("--method", help="ddim (inversion) or sdedit.")] = "ddim",
    steps: Steps = 50,
    strength: Annotated[
        float, typer.Option("--strength", help="SDEdit noise level, 0–1 (more = freer).")
    ] = 0.6,
    seed: Annotated[int, typer.Option("--seed", min=0)] = 0,
    as_json: AsJson = False,
) -> None:
    """Restain tiles with the diffusion model; reports hematoxylin-channel SSIM per tile."""
    from histopilot.tools.diffusion import TileDiffusion, transfer_stain

    diffusion = TileDiffusion.from_pretrained(model)
    rows = []
    for tile, resized in _model_tiles(inputs, diffusion.image_size):
        result = transfer_stain(
            diffusion,
            resized[None],
            source,
            target,
            method=method,
            steps=steps,
            strength=strength,
            seed=seed,
        )
        made = f"virtual stain: diffusion {method} transfer from {source} to {target} ({model})"
        path = save_png(result.images[0], out / f"{tile.name}.png", generated=made)
        rows.append(
            {
                "source": tile.source,
                "output": str(path),
                "hematoxylin_ssim": result.hematoxylin_ssim[0],
                "virtual": True,
                "notice": GENERATED_NOTICE,
            }
        )
    _write_json_rows(out / "transfer.json", rows)
    _report({"out": str(out), "tiles": rows}, as_json, f"{len(rows)} tiles → {out}")


@diffusion_app.command("counterfactual")
@reports_user_errors
def diffusion_counterfactual(
    inputs: StainInputs,
    out: StainOut,
    model: ModelFolder,
    classifier: Annotated[Path, typer.Option("--classifier", help="Classifier to explain.")],
    target: Annotated[str, typer.Option("--target", help="Class to move the tiles toward.")],
    oracle: Annotated[
        Path | None, typer.Option("--oracle", help="Independent classifier to check flips.")
    ] = None,
    steps: Steps = 50,
    strength: Annotated[float, typer.Option("--strength", help="Inversion depth, 0–1.")] = 0.6,
    scale: Annotated[float, typer.Option("--scale", help="Classifier guidance scale.")] = 8.0,
    source_condition: Annotated[
        str | None,
        typer.Option(
            "--source-condition", help="The tiles' condition (default: the predicted class)."
        ),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Counterfactual tiles toward a class, with heatmaps and before/after probabilities."""
    from histopilot.tools.diffusion import Guide, TileClassifier, TileDiffusion, counterfactuals

    diffusion = TileDiffusion.from_pretrained(model)
    explained = TileClassifier.load(classifier)
    checker = TileClassifier.load(oracle) if oracle else None
    guide = Guide(scale=scale, strength=strength, steps=steps)
    rows = []
    for tile, resized in _model_tiles(inputs, diffusion.image_size):
        (result,) = counterfactuals(
            diffusion,
            explained,
            resized[None],
            target,
            guide=guide,
            oracle=checker,
            source_condition=source_condition,
        )
        made = f"counterfactual toward {target} (diffusion model {model})"
        image = save_png(result.image, out / f"{tile.name}.png", generated=made)
        panel = save_png(result.panel(), out / f"{tile.name}-compare.png", generated=made)
        rows.append(
            {
                "source": tile.source,
                "output": str(image),
                "compare": str(panel),
                **result.summary(),
                "virtual": True,
                "notice": GENERATED_NOTICE,
            }
        )
    _write_json_rows(out / "counterfactuals.json", rows)
    flipped = sum(row["flipped"] for row in rows)
    _report(
        {"out": str(out), "tiles": rows},
        as_json,
        f"{flipped}/{len(rows)} flipped to {target} → {out}",
    )


def _model_tiles(inputs: list[Path], size: int):
    """Input tiles (files, folders, slides) with copies resized to the model's tile size."""
    import cv2

    from histopilot.tools.stain.files import SlideTiling, iter_inputs

    for tile in iter_inputs(inputs, SlideTiling()):
        if tile.image is None:
            raise ImageInputError(f"{tile.source}: {tile.problem}")
        yield tile, cv2.resize(tile.image, (size, size), interpolation=cv2.INTER_AREA)


def _write_json_rows(path: Path, rows: list[dict]) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(rows, indent=2) + "\n")


# -- knowledge base -------------------------------------------------------------------------
@kb_app.command("build")
@reports_user_errors
def kb_build(
    sources: Annotated[
        list[Path],
        typer.Argument(help="OBO ontologies, OncoTree JSON, Markdown/text/PDF files or folders."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Knowledge-base folder to write.")],
    embedder: Annotated[
        str | None,
        typer.Option("--embedder", help="sentence-transformers model (default: config)."),
    ] = None,
    device: Device = None,
    config: ConfigPath = None,
    as_json: AsJson = False,
) -> None:
    """Build a hybrid (dense + BM25) knowledge base from SOURCES."""
    from histopilot.retrieval.kb import KnowledgeBase, load_sources

    passages = load_sources(sources)
    name = embedder or load_config(config).encoders.kb_embedder
    with _progress() as progress:
        task = progress.add_task("embedding", total=len(passages))
        kb = KnowledgeBase.build(
            passages,
            out,
            embedder=name,
            device=device,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    manifest = kb.manifest.model_dump(mode="json")
    _report(manifest | {"path": str(out)}, as_json, f"{len(kb)} passages ({name}) → {out}")


@kb_app.command("query")
@reports_user_errors
def kb_query(
    kb_path: Annotated[Path, typer.Argument(help="Knowledge-base folder.")],
    question: Annotated[str, typer.Argument(help="What to look up.")],
    k: Annotated[int, typer.Option("-k", min=1, max=100, help="Passages to return.")] = 5,
    mode: Annotated[str, typer.Option("--mode", help="hybrid, dense or bm25.")] = "hybrid",
    reranker: Annotated[
        str | None, typer.Option("--reranker", help="Cross-encoder to re-score with.")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """The passages that best answer QUESTION, with their sources."""
    from histopilot.retrieval.kb import KnowledgeBase

    hits = KnowledgeBase.open(kb_path, reranker=reranker).query(question, k, mode=mode)  # type: ignore[arg-type]
    if as_json:
        _print_json({"query": question, "hits": [hit.model_dump(mode="json") for hit in hits]})
        return
    console = Console()
    for hit in hits:
        source = hit.passage.source
        where = (
            source.ontology_id
            or source.code
            or (
                f"{source.file}:{source.char_start}"
                if source.char_start is not None
                else source.file
            )
        )
        console.print(
            f"[bold]{hit.rank}. {escape(hit.passage.title)}[/] ({escape(where)}, {hit.score:.3f})"
        )
        console.print(escape(hit.passage.text[:300]), highlight=False)


# --- extraction ---------------------------------------------------------------------------------

ExtractBackend = Annotated[
    str,
    typer.Option(
        "--backend",
        help="offline (rules, no model) | openai | transformers (the extractor role's model).",
    ),
]
Concurrency = Annotated[
    int, typer.Option("--concurrency", min=1, max=256, help="Parallel requests to a model server.")
]
SchemaOption = Annotated[
    str, typer.Option("--schema", help="auto, or a schema name: breast, colorectal, lung, …")
]


def _with_backend(config: HistopilotConfig, role: str, backend: str) -> HistopilotConfig:
    """``config`` with ``role`` on ``backend`` (its model settings kept)."""
    if backend not in ("offline", "openai", "transformers"):
        raise HistopilotError(f"--backend must be offline, openai or transformers, not {backend!r}")
    settings = config.roles[role].model_copy(update={"backend": backend})
    return config.model_copy(update={"roles": config.roles.model_copy(update={role: settings})})


@app.command("extract")
@reports_user_errors
def extract(
    inputs: Annotated[
        list[Path], typer.Argument(help="Text files, folders of them, or JSON lines with 'text'.")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Output .jsonl or .csv (appended, resumable).")
    ],
    schema: SchemaOption = "auto",
    backend: ExtractBackend = "offline",
    concurrency: Concurrency = 8,
    combine: Annotated[
        bool,
        typer.Option("--combine/--model-only", help="Let the rules fill what a model leaves out."),
    ] = True,
    config: ConfigPath = None,
    profile: Profile = None,
    as_json: AsJson = False,
) -> None:
    """Structured fields, each with its text span, from free-text pathology reports."""
    from histopilot.tools.extract import configured_extractor
    from histopilot.tools.extract.batch import RecordWriter, iter_reports, run_batch

    settings = _with_backend(load_config(config, profile=profile), "extractor", backend)
    extractor = configured_extractor(settings, schema, combined=combine)
    writer = RecordWriter(out)
    total = sum(1 for _ in iter_reports(inputs, skip=out))
    try:
        with _progress() as progress:
            task = progress.add_task("extracting", total=total)
            written, skipped, failures = run_batch(
                inputs,
                extractor,
                writer,
                concurrency=concurrency if backend != "offline" else 1,
                on_done=lambda: progress.advance(task),
            )
    finally:
        writer.close()
    for failure in failures:
        stderr.print(f"skipped {escape(failure.id)}: {escape(failure.reason)}")
    summary = {
        "written": written,
        "already_done": skipped,
        "failed": [f.model_dump() for f in failures],
        "out": str(out),
        "notice": EXTRACTION_NOTICE,
    }
    _report(
        summary,
        as_json,
        f"{written} record(s) written to {out}"
        + (f", {skipped} already there" if skipped else "")
        + (f", {len(failures)} skipped (see above)" if failures else "")
        + f". {EXTRACTION_NOTICE}",
    )
    if failures and not written and not skipped:
        raise typer.Exit(1)  # nothing could be extracted: say so to scripts too


# -- cohorts -------------------------------------------------------------------------------------
@app.command("batch")
@reports_user_errors
def batch(
    sources: Annotated[
        list[Path],
        typer.Argument(
            metavar="SLIDES_OR_MANIFEST...",
            help="A manifest (CSV, TSV, JSON lines or Parquet: path or slide, optional id, mpp, "
            "label; for extract: path or text), folders, or slide or report files.",
        ),
    ],
    task: Annotated[
        str, typer.Option("--task", help="index (embed into one patch index), analyze, extract.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Results folder; rerun into it to resume.")],
    engine: Annotated[
        str, typer.Option("--engine", help="local (processes here) or ray (a Ray cluster).")
    ] = "local",
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=1,
            help="Workers, each with its own models (default: "
            "one per core here, or what the Ray cluster holds).",
        ),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="ray: the cluster (ray://head:10001, or 'auto'); default: a local cluster.",
        ),
    ] = None,
    gpus_per_worker: Annotated[
        float, typer.Option("--gpus-per-worker", min=0.0, help="ray: GPUs each worker holds.")
    ] = 0.0,
    cpus_per_worker: Annotated[
        float,
        typer.Option(
            "--cpus-per-worker",
            min=0.1,
            help="ray: CPUs each worker holds (tile reading and the offline encoder run on them).",
        ),
    ] = 1.0,
    shards: Shards = 1,
    schema: SchemaOption = "auto",
    question: Question = None,
    budget: Budget = None,
    trajectories: Trajectories = None,
    config: ConfigPath = None,
    profile: Profile = None,
    as_json: AsJson = False,
) -> None:
    """Run one task over a cohort of slides or reports: one result per item in OUT/results,
    a summary of done / failed / skipped, and finished items skipped when run again."""
    from pydantic import ValidationError

    from histopilot.batch import ENGINES, TASKS, BatchOptions, run_cohort

    if task not in TASKS:
        raise HistopilotError(f"--task must be one of {', '.join(TASKS)}, not {task!r}.")
    if engine not in ENGINES:
        raise HistopilotError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}.")
    agents = {"budget": budget, "trajectories": trajectories}
    try:
        options = BatchOptions(
            task=task,
            config=load_config(config, profile=profile),
            schema_name=schema,
            question=question,
            agents={key: value for key, value in agents.items() if value is not None},
            shards=shards,
        )
    except ValidationError as error:
        raise HistopilotError(
            "; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())
        ) from None

    def heard(item, outcome) -> None:
        if outcome.status == "done":
            line = f"done {item.id} ({outcome.seconds:.1f} s)"
        else:
            line = f"[red]failed[/] {escape(item.id)}: {escape(outcome.error or '')}"
        stderr.print(line, highlight=False, soft_wrap=True)

    summary = run_cohort(
        sources,
        options,
        out,
        engine=engine,
        workers=workers,
        address=address,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
        on_outcome=heard,
    )
    if as_json:
        _print_json(summary)
    else:
        for row in summary.items:
            if row["status"] == "rejected":
                stderr.print(f"rejected {escape(row['id'])}: {escape(row['error'])}")
        rate = f", {summary.items_per_hour:g} per hour" if summary.items_per_hour else ""
        stderr.print(
            f"{summary.done} done, {summary.failed} failed, {summary.skipped} skipped "
            f"(finished before), {summary.rejected} rejected in {summary.seconds:g} s "
            f"on {summary.workers} {engine} worker(s){rate}. Summary: {out / 'summary.csv'}",
            highlight=False,
        )
    if summary.failed or summary.rejected or summary.not_run:
        raise typer.Exit(1)  # scripts learn that some items need attention


# -- evaluations ---------------------------------------------------------------------------------
EvalOut = Annotated[
    Path | None,
    typer.Option(
        "--out", help="Folder for scores.json, report.md, items.jsonl, the plots and run.json."
    ),
]
EvalColumns = Annotated[
    list[str] | None,
    typer.Option("--column", help="NAME=COLUMN: read NAME from another column (repeatable)."),
]
Meteor = Annotated[
    bool, typer.Option("--meteor/--no-meteor", help="METEOR (needs Java; skipped without it).")
]
KList = Annotated[str, typer.Option("--k", help="Ranks to score, comma-separated.")]


def _report_evaluation(evaluation, out: Path | None, as_json: bool) -> None:
    """Write the evaluation's folder when asked; print JSON or the Markdown tables."""
    from histopilot.evals.outputs import write_evaluation

    if out is not None:
        write_evaluation(evaluation, out)
        stderr.print(f"scores, tables, plots and run card → {out}/", highlight=False)
    if as_json:
        _print_json(evaluation.summary())
    else:
        typer.echo(evaluation.markdown())


def _check_eval_out(out: Path | None) -> None:
    from histopilot.evals.outputs import check_output_folder

    if out is not None:
        check_output_folder(out)


def _integers(text: str, option: str) -> list[int]:
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise HistopilotError(f"{option} takes positive integers separated by commas, not {text!r}")
    return values


@eval_app.command("extraction")
@reports_user_errors
def eval_extraction(
    data: Annotated[Path, typer.Option("--data", help="Gold JSON lines: report_id, text, gold.")],
    backend: ExtractBackend = "offline",
    schema: SchemaOption = "auto",
    out: EvalOut = None,
    concurrency: Concurrency = 8,
    config: ConfigPath = None,
    profile: Profile = None,
    as_json: AsJson = False,
) -> None:
    """Per-field accuracy of an extractor against gold fields (overall and where stated)."""
    _check_eval_out(out)
    from histopilot.evals.card import role_record
    from histopilot.evals.extraction import evaluate_extraction
    from histopilot.tools.extract import configured_extractor

    settings = _with_backend(load_config(config, profile=profile), "extractor", backend)
    extractor = configured_extractor(settings, schema)
    with _progress() as progress:
        task = progress.add_task("extracting", total=None)
        evaluation = evaluate_extraction(
            data,
            extractor,
            models=[role_record(settings, "extractor")],
            options={"backend": backend, "schema": schema},
            workers=concurrency if backend != "offline" else 1,
            on_done=lambda: progress.advance(task),
        )
    _report_evaluation(evaluation, out, as_json)


@eval_app.command("report-generation")
@reports_user_errors
def eval_report_generation(
    data: Annotated[
        Path,
        typer.Option("--data", help="Table (CSV, JSONL, Parquet) with generated and reference."),
    ],
    backend: ExtractBackend = "offline",
    schema: SchemaOption = "auto",
    columns: EvalColumns = None,
    meteor: Meteor = True,
    out: EvalOut = None,
    concurrency: Concurrency = 8,
    config: ConfigPath = None,
    profile: Profile = None,
    as_json: AsJson = False,
) -> None:
    """Generated reports against references: BLEU, ROUGE-L, METEOR, CIDEr and synoptic field
    agreement (both read by the same extractor)."""
    _check_eval_out(out)
    from histopilot.evals.card import role_record
    from histopilot.evals.report_generation import COLUMNS, evaluate_report_generation
    from histopilot.evals.tables import parse_columns
    from histopilot.tools.extract import configured_extractor

    renamed = parse_columns(columns or [], ("id", *COLUMNS))
    settings = _with_backend(load_config(config, profile=profile), "extractor", backend)
    extractor = configured_extractor(settings, schema)
    with _progress() as progress:
        task = progress.add_task("reading reports", total=None)
        evaluation = evaluate_report_generation(
            data,
            extractor,
            models=[role_record(settings, "extractor")],
            options={"backend": backend, "schema": schema, "columns": renamed, "meteor": meteor},
            columns=renamed,
            workers=concurrency if backend != "offline" else 1,
            meteor=meteor,
            on_done=lambda: progress.advance(task),
        )
    _report_evaluation(evaluation, out, as_json)


@eval_app.command("vqa")
@reports_user_errors
def eval_vqa(
    data: Annotated[
        Path,
        typer.Option(
            "--data", help="Table (CSV, JSONL, Parquet) of image, question, answer [, choices]."
        ),
    ],
    reference: Annotated[
        Path | None,
        typer.Option(
            "--reference",
            help="Offline: a labelled patch index; questions are answered from its nearest "
            "patches (a tissue-class baseline, not a describer).",
        ),
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            "--backend",
            help="offline | openai | transformers for the describer (default: as configured).",
        ),
    ] = None,
    columns: EvalColumns = None,
    meteor: Meteor = True,
    out: EvalOut = None,
    config: ConfigPath = None,
    profile: Profile = None,
    as_json: AsJson = False,
) -> None:
    """Visual question answering: exact match for closed questions, token F1 and text metrics
    for open ones. Questions about whole slides go to the chat agent."""
    _check_eval_out(out)
    import tempfile

    from histopilot.agents.context import AgentContext
    from histopilot.evals.card import ModelRecord, encoder_record, role_record
    from histopilot.evals.tables import parse_columns
    from histopilot.evals.vqa import (
        COLUMNS,
        OPTIONAL,
        ModelAnswerer,
        ReferenceAnswerer,
        SlideChatAnswerer,
        evaluate_vqa,
    )

    renamed = parse_columns(columns or [], ("id", *COLUMNS, *OPTIONAL))
    configured = load_config(config, profile=profile)
    settings = configured if backend is None else _with_backend(configured, "describer", backend)
    answerer, models = None, []
    if settings.roles.describer.backend != "offline":
        from histopilot.serve.factory import chat_model

        answerer = ModelAnswerer(chat_model("describer", settings))
        models.append(role_record(settings, "describer"))
    elif reference is not None:
        from histopilot.retrieval.encoders import load_encoder
        from histopilot.retrieval.reference import ReferenceBank

        bank = ReferenceBank.open(reference)
        answerer = ReferenceAnswerer(bank, load_encoder(bank.encoder))
        models += [
            ModelRecord(role="describer", backend="offline", model=f"reference bank {reference}"),
            encoder_record(bank.encoder),
        ]
    slides = None
    if settings.roles.orchestrator.backend != "offline":
        slides = SlideChatAnswerer(lambda: AgentContext.from_config(settings))
        models.append(role_record(settings, "orchestrator"))
    options = {"backend": backend, "reference": reference, "columns": renamed}
    with tempfile.TemporaryDirectory(prefix="histopilot-vqa-") as scratch, _progress() as progress:
        task = progress.add_task("answering", total=None)
        try:
            evaluation = evaluate_vqa(
                data,
                answerer,
                slides=slides,
                images=Path(scratch),
                models=models,
                options=options,
                columns=renamed,
                meteor=meteor,
                on_done=lambda: progress.advance(task),
            )
        finally:
            if slides is not None:
                slides.close()
    _report_evaluation(evaluation, out, as_json)


@eval_app.command("retrieval")
@reports_user_errors
def eval_retrieval(
    index: Annotated[
        Path | None, typer.Option("--index", help="A patch index with labelled patches.")
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option("--images", help="Or a folder of labelled patch images (indexed for you)."),
    ] = None,
    labels: Annotated[
        Path | None, typer.Option("--labels", help="CSV of file,label for --images.")
    ] = None,
    level: Annotated[
        str, typer.Option("--level", help="patch, or slide (each slide queries with its mosaic).")
    ] = "patch",
    k: KList = "1,3,5",
    encoder: EncoderName = None,
    out: EvalOut = None,
    config: ConfigPath = None,
    as_json: AsJson = False,
) -> None:
    """Leave-one-out search quality on a labelled set: acc@k, MV@k (k-NN accuracy), mMV@k."""
    _check_eval_out(out)
    from histopilot.evals.card import encoder_record
    from histopilot.evals.retrieval import evaluate_image_folder, evaluate_index
    from histopilot.retrieval.patch_index import PatchIndex

    ranks = _integers(k, "--k")
    if (index is None) == (images is None):
        raise HistopilotError("give one of --index INDEX or --images FOLDER")
    if level not in ("patch", "slide"):
        raise HistopilotError(f"--level must be patch or slide, not {level!r}")
    options = {"index": index, "images": images, "labels": labels, "level": level, "k": ranks}
    if images is not None:
        if level != "patch":
            raise HistopilotError("--images holds patches: use --level patch, or --index")
        patch_encoder = _patch_encoder(encoder, None, config)
        evaluation = evaluate_image_folder(
            images,
            labels,
            patch_encoder,
            k=ranks,
            models=[encoder_record(patch_encoder.name)],
            options=options,
        )
    else:
        opened = PatchIndex.open(index)
        evaluation = evaluate_index(
            opened,
            level=level,
            k=ranks,
            models=[encoder_record(opened.encoder)],
            options=options,
        )
    _report_evaluation(evaluation, out, as_json)


@eval_app.command("generation")
@reports_user_errors
def eval_generation(
    manifest: Annotated[
        Path,
        typer.Argument(
            help="stain.csv, transfer.json or counterfactuals.json from the tools, or any table "
            "with source and output columns."
        ),
    ],
    reference: Annotated[
        Path | None,
        typer.Option(
            "--reference",
            help="Folder of real labelled tiles: the target for FID/KID and the independent "
            "classifier's examples.",
        ),
    ] = None,
    labels: Annotated[
        Path | None, typer.Option("--labels", help="CSV of file,label for --reference.")
    ] = None,
    target: Annotated[
        str | None,
        typer.Option("--target", help="The target class: FID against its tiles, flip rate to it."),
    ] = None,
    features: Annotated[
        str,
        typer.Option(
            "--features",
            help="FID features: auto (Inception when available locally), inception, or patch.",
        ),
    ] = "auto",
    encoder: EncoderName = None,
    neighbours: Annotated[
        int, typer.Option("--neighbours", min=1, help="k of the independent k-NN classifier.")
    ] = 5,
    columns: EvalColumns = None,
    out: EvalOut = None,
    config: ConfigPath = None,
    as_json: AsJson = False,
) -> None:
    """Stain transfer and counterfactuals: closeness to the source, FID/KID to the target,
    flip rate by an independent classifier."""
    _check_eval_out(out)
    from histopilot.evals.card import ModelRecord, encoder_record
    from histopilot.evals.generation import FeatureEncoder, evaluate_generation, feature_encoder
    from histopilot.evals.tables import parse_columns
    from histopilot.retrieval.reference import read_labels

    if features not in ("auto", "inception", "patch"):
        raise HistopilotError(f"--features must be auto, inception or patch, not {features!r}")
    renamed = parse_columns(columns or [], ("id", "source", "output", "flag"))
    labelled = read_labels(reference, labels) if reference is not None else None
    if target is not None and labelled is not None:
        known = sorted({image.label for image in labelled})
        if target not in known:
            raise HistopilotError(f"--target {target!r} is not a label of {reference} ({known})")
    fid_features = reader = None
    models = []
    if labelled:
        patch = _patch_encoder(encoder, None, config)
        reader = FeatureEncoder(patch.name, patch.encode_images)
        fid_features = feature_encoder(features, patch)
        models = [
            ModelRecord(role="FID/KID features", backend="encoder", model=fid_features.name),
            encoder_record(patch.name, role="independent k-NN reader"),
        ]
    evaluation = evaluate_generation(
        manifest,
        reference=labelled,
        target=target,
        features=fid_features,
        reader=reader,
        models=models,
        options={
            "reference": reference,
            "labels": labels,
            "target": target,
            "features": features,
            "neighbours": neighbours,
            "columns": renamed,
        },
        columns=renamed,
        neighbours=neighbours,
    )
    _report_evaluation(evaluation, out, as_json)


@eval_app.command("agent")
@reports_user_errors
def eval_agent(
    slides: Annotated[
        Path, typer.Option("--slides", help="CSV of slide,label[,mpp]; paths relative to it.")
    ],
    budgets: Annotated[
        str | None,
        typer.Option(
            "--budgets",
            help="Region budgets to sweep, comma-separated (default: the configured budget).",
        ),
    ] = None,
    mapping: Annotated[
        list[str] | None,
        typer.Option("--map", help="DIAGNOSIS=LABEL: count a diagnosis label as a set label."),
    ] = None,
    trajectories: Trajectories = None,
    seed: Seed = None,
    reference: ReferenceBank = None,
    knowledge: Knowledge = None,
    out: EvalOut = None,
    config: ConfigPath = None,
    profile: Profile = None,
    as_json: AsJson = False,
) -> None:
    """Labelled slides through `analyze`: accuracy, balanced accuracy, regions examined, wall
    time, and accuracy against regions examined."""
    _check_eval_out(out)
    from histopilot.agents.context import AgentContext
    from histopilot.evals.agent import evaluate_agent
    from histopilot.evals.card import encoder_record, role_record

    pairs = {}
    for item in mapping or []:
        said, sep, label = item.partition("=")
        if not sep or not said or not label:
            raise HistopilotError(f"--map {item!r}: write DIAGNOSIS_LABEL=SET_LABEL")
        pairs[said] = label
    settings = load_config(config, profile=profile)
    overrides = {
        "trajectories": trajectories,
        "seed": seed,
        **_resource_overrides(reference, knowledge),
    }
    evaluation = evaluate_agent(
        slides,
        lambda: AgentContext.from_config(settings, **overrides),
        budgets=_integers(budgets, "--budgets") if budgets else None,
        mapping=pairs,
        models=[
            *(
                role_record(settings, role)
                for role in ("orchestrator", "describer", "diagnoser", "reporter")
            ),
            encoder_record(settings.encoders.patch),
        ],
        options={"map": pairs, **overrides},
        on_done=lambda line: stderr.print(f"[dim]{escape(line)}[/]", highlight=False),
    )
    _report_evaluation(evaluation, out, as_json)


# -- reports --------------------------------------------------------------------------------
@report_app.command("render")
@reports_user_errors
def report_render(
    source: Annotated[
        Path,
        typer.Argument(
            help="analysis.json from `analyze`, a synoptic report (JSON) or an extraction record."
        ),
    ],
    fmt: Annotated[
        ReportFormat,
        typer.Option("--format", "-f", help="md, html, json, or fhir (a FHIR R4 Bundle)."),
    ] = ReportFormat.md,
    out: Annotated[
        Path | None, typer.Option("--out", help="File to write (default: print to stdout).")
    ] = None,
) -> None:
    """Render the synoptic report of an analysis or an extraction for reading or exchange."""
    from histopilot.tools.report import load_report, render

    text = render(load_report(source), fmt)
    if out is None:
        sys.stdout.write(text)
        return
    with atomic_file(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    stderr.print(f"{fmt.value} report → {out}", highlight=False)


@report_app.command("schema")
@reports_user_errors
def report_schema(
    name: Annotated[
        str,
        typer.Argument(help=f"{', '.join(SCHEMAS)}, or {', '.join(SCHEMA_ALIASES)}."),
    ],
    as_json: AsJson = False,
) -> None:
    """The elements of a synoptic schema: field, label, accepted values, description."""
    from histopilot.tools.report import describe_schema, schema_named
    from histopilot.tools.report.document import schema_title

    schema = schema_named(name)
    if as_json:
        _print_json(schema.model_json_schema())
        return
    key = schema.model_fields["schema_name"].default
    table = Table(title=f"{key}: {escape(schema_title(schema))}", title_justify="left")
    table.add_column("field", no_wrap=True)
    for column in ("label", "values", "description"):
        table.add_column(column)
    for element in describe_schema(schema):
        table.add_row(
            *(escape(text) for text in (element.name, element.label, element.values)),
            escape(element.description),
        )
    Console().print(table)


def main() -> None:
    app()
