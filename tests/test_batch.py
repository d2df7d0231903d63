"""Cohort runs: the local and Ray engines give the same results, and any run can be killed and
run again without losing or repeating work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

from histopilot.batch import BatchOptions, run_cohort
from histopilot.batch.manifest import read_cohort
from histopilot.config import AgentsConfig, HistopilotConfig
from histopilot.errors import HistopilotError, OutputError
from histopilot.retrieval.patch_index import PatchIndex

#: Declared finer than scanned, so the encoder reads each slide downsampled: a few tiles each.
COHORT = """path,id,mpp,site
{wsi}/CMU-1-Small-Region.svs,cmu1,0.125,lung
{wsi}/tcga-cr-7395-01a-01-ts1.svs,tcga-cr-7395,0.125,head and neck
{wsi}/dicom-wsi-TCGA-XK-AAJU-01A-01-TS1-level.dcm,tcga-xk-aaju,0.125,prostate
{wsi}/idr0073-kidney-48-5-ihc-thumbnail.tif,kidney,4.0,kidney
{wsi}/vectra-polaris-3ch-small.qptiff,vectra,,
missing.svs,ghost,,
"""
DONE = {"cmu1", "tcga-cr-7395", "tcga-xk-aaju", "kidney"}
FAILED = {"vectra", "ghost"}  # fluorescence, and a file that is not there


@pytest.fixture(scope="module")
def manifest(wsi_dir: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cohort") / "cohort.csv"
    path.write_text(COHORT.format(wsi=wsi_dir))
    return path


@pytest.fixture(scope="module")
def options(tmp_path_factory) -> BatchOptions:
    cache = tmp_path_factory.mktemp("features")
    config = HistopilotConfig(agents=AgentsConfig(feature_cache=str(cache)))
    return BatchOptions(task="index", config=config)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster on this machine's cores, shared by the module's Ray runs."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def worker_processes(engine: str) -> list[psutil.Process]:
    if engine == "local":  # the pool's spawned processes
        candidates = psutil.Process().children(recursive=True)
    else:  # Ray names its actor processes after the actor class
        candidates = list(psutil.process_iter())
    found = []
    for process in candidates:
        try:
            command = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if ("spawn_main" in command) if engine == "local" else ("CohortActor" in command):
            found.append(process)
    return found


def killing_a_busy_worker(heard: list[str], engine: str):
    """An outcome callback that, on the first outcome, kills another worker, one still busy
    with its first item, and notes every item reported."""

    def heard_of(item, outcome) -> None:
        if not heard:
            reporter = int(outcome.worker.rsplit(":", 1)[1])
            busy = [p for p in worker_processes(engine) if p.pid != reporter]
            assert busy, "no other worker to kill"
            busy[0].kill()
        heard.append(item.id)

    return heard_of


@pytest.fixture(scope="module")
def local_run(manifest, options, tmp_path_factory):
    """The cohort on two local worker processes, one of them killed mid-run."""
    out = tmp_path_factory.mktemp("local") / "run"
    heard: list[str] = []
    summary = run_cohort(
        [manifest],
        options,
        out,
        engine="local",
        workers=2,
        on_outcome=killing_a_busy_worker(heard, "local"),
    )
    return out, summary, heard


def results(out: Path) -> dict[str, dict]:
    """Each item's result, without what depends on the run (timings, worker)."""
    found = {}
    for path in sorted((out / "results").glob("*.json")):
        entry = json.loads(path.read_text())
        found[entry["id"]] = {k: v for k, v in entry.items() if k not in ("seconds", "worker")}
    return found


def index_vectors(out: Path) -> dict[str, np.ndarray]:
    index = PatchIndex.open(out / "index")
    with index._db() as db:
        rows = db.execute("SELECT slide_id, x, y, vector FROM patches ORDER BY slide_id, y, x")
        stacked: dict[str, list] = {}
        for slide_id, x, y, vector in rows:
            stacked.setdefault(slide_id, []).append((x, y, np.frombuffer(vector, np.float32)))
    return {
        slide: np.stack([np.r_[x, y, v] for x, y, v in rows]) for slide, rows in stacked.items()
    }


def test_local_engine_indexes_the_cohort_and_records_each_failure(local_run):
    out, summary, heard = local_run
    assert sorted(heard) == sorted(DONE | FAILED)  # the killed worker's item was retried, once
    assert (summary.done, summary.failed, summary.skipped) == (4, 2, 0)
    assert set(results(out)) == DONE
    failures = {p.stem: json.loads(p.read_text())["error"] for p in (out / "failed").iterdir()}
    assert set(failures) == FAILED
    assert "fluorescence" in failures["vectra"] and "no slide at" in failures["ghost"]
    assert results(out)["tcga-cr-7395"]["metadata"] == {"site": "head and neck"}
    index = PatchIndex.open(out / "index")
    assert {entry.slide_id for entry in index.slides()} == DONE
    hits = index.search(index.vectors([0]), k=1)
    assert hits[0][0].id == 0  # the index answers searches
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0] == "id,status,seconds,worker,error" and len(rows) == 7


def test_ray_engine_gives_the_same_results_and_survives_a_killed_worker(
    ray_cluster, local_run, manifest, options, tmp_path
):
    local_out, _, _ = local_run
    heard: list[str] = []
    summary = run_cohort(
        [manifest],
        options,
        tmp_path / "ray",
        engine="ray",
        workers=2,
        on_outcome=killing_a_busy_worker(heard, "ray"),
    )
    assert sorted(heard) == sorted(DONE | FAILED)  # Ray replaced the actor and retried its item
    assert (summary.done, summary.failed, summary.workers) == (4, 2, 2)
    assert results(tmp_path / "ray") == results(local_out)
    ray_vectors, local_vectors = index_vectors(tmp_path / "ray"), index_vectors(local_out)
    assert ray_vectors.keys() == local_vectors.keys() == DONE
    for slide in DONE:
        np.testing.assert_array_equal(ray_vectors[slide], local_vectors[slide])


def test_rerun_skips_finished_items_retries_failed_ones_and_redoes_changed_ones(
    local_run, manifest, options, wsi_dir, tmp_path
):
    out, _, _ = local_run
    written = {p.name: p.stat().st_mtime_ns for p in (out / "results").iterdir()}
    moved = tmp_path / "kidney-rescanned.tif"  # the id now names another file
    moved.write_bytes((wsi_dir / "idr0073-kidney-48-5-ihc-thumbnail.tif").read_bytes())
    changed = tmp_path / "changed.csv"
    changed.write_text(
        manifest.read_text().replace(f"{wsi_dir}/idr0073-kidney-48-5-ihc-thumbnail.tif", str(moved))
    )
    third = run_cohort([changed], options, out, engine="local", workers=2)
    assert (third.done, third.failed, third.skipped) == (1, 2, 3)
    assert results(out)["kidney"]["input"]["path"] == str(moved)
    unchanged = {p.name: p.stat().st_mtime_ns for p in (out / "results").iterdir()}
    assert {name: unchanged[name] for name in written if name != "kidney.json"} == {
        name: stamp for name, stamp in written.items() if name != "kidney.json"
    }
    slides = {e.slide_id: e.slide_path for e in PatchIndex.open(out / "index").slides()}
    assert slides["kidney"] == str(moved) and len(slides) == 4


def test_a_killed_run_resumes_where_it_stopped(manifest, tmp_path, options):
    """The whole `histopilot batch` process is killed after its first result; the rerun
    finishes the rest and leaves the first run's results as they were."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "histopilot", "batch", str(manifest), "--task", "index"]
    command += ["--out", str(out), "--workers", "1"]
    env = os.environ | {"HISTOPILOT_AGENTS__FEATURE_CACHE": options.config.agents.feature_cache}
    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    for line in first.stderr:
        if line.startswith("done "):
            first.kill()
            break
    first.wait(timeout=60)
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "results").iterdir()}
    assert 1 <= len(kept) < len(DONE)
    rerun = subprocess.run([*command, "--json"], capture_output=True, text=True, env=env)
    summary = json.loads(rerun.stdout)
    assert rerun.returncode == 1  # two items failed, as scripts are told
    assert summary["skipped"] == len(kept) and summary["done"] == len(DONE) - len(kept)
    assert {
        p.name: p.stat().st_mtime_ns for p in (out / "results").iterdir() if p.name in kept
    } == kept
    assert {entry.slide_id for entry in PatchIndex.open(out / "index").slides()} == DONE


def test_extract_task_reads_reports_from_a_manifest(test_data, tmp_path):
    gold = test_data / "reports" / "tcga_reports_gold_dev.jsonl"
    rows = [json.loads(line) for line in gold.read_text().splitlines()[:3]]
    manifest = tmp_path / "reports.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"id": f"r{i}", "text": row["text"]}) + "\n" for i, row in enumerate(rows)
        )
        + json.dumps({"id": "empty", "text": "  "})
        + "\n"
    )
    options = BatchOptions(task="extract", config=HistopilotConfig())
    summary = run_cohort([manifest], options, tmp_path / "out", engine="local", workers=1)
    assert (summary.done, summary.rejected) == (3, 1)
    assert summary.items[-1] == {
        "id": "empty",
        "status": "rejected",
        "error": "the row names no file and holds no text",
    }
    extracted = results(tmp_path / "out")["r0"]["result"]
    assert extracted["schema"] and "pT" in json.dumps(extracted["fields"])

    lines = manifest.read_text().splitlines()
    lines[1] = json.dumps({"id": "r1", "text": "Addendum: margins negative. " + rows[1]["text"]})
    manifest.write_text("\n".join(lines) + "\n")  # one report edited: only it runs again
    again = run_cohort([manifest], options, tmp_path / "out", engine="local", workers=1)
    assert (again.done, again.skipped) == (1, 2)
    assert [row["id"] for row in again.items if row["status"] == "done"] == ["r1"]


def test_analyze_task_writes_a_report_per_slide(wsi_dir, options, tmp_path):
    analyze = options.model_copy(
        update={"task": "analyze", "agents": {"budget": 2, "trajectories": 1}}
    )
    manifest = tmp_path / "one.csv"
    manifest.write_text(f"path,mpp\n{wsi_dir}/idr0073-kidney-48-5-ihc-thumbnail.tif,4.0\n")
    summary = run_cohort([manifest], analyze, tmp_path / "out", engine="local", workers=1)
    assert summary.done == 1, summary.items
    folder = tmp_path / "out" / "analyses" / "idr0073-kidney-48-5-ihc-thumbnail"
    assert {p.name for p in folder.iterdir()} == {
        "report.md",
        "analysis.json",
        "regions.geojson",
        "audit.json",
    }
    result = results(tmp_path / "out")["idr0073-kidney-48-5-ihc-thumbnail"]["result"]
    assert result["assessment"] and result["regions"] >= 1


def test_hostile_and_broken_manifest_rows_are_rejected_with_reasons(tmp_path, wsi_dir):
    slide = wsi_dir / "CMU-1-Small-Region.svs"
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        f"path,id,mpp\n{slide},../../etc/passwd,\n{slide},a,\n{slide},A,\n{slide},b,-3\n,c,\n"
    )
    cohort = read_cohort([manifest], "index")
    assert [item.id for item in cohort.items] == ["a"]
    reasons = {rejected.id: rejected.reason for rejected in cohort.rejected}
    assert "letters, digits" in reasons["../../etc/passwd"]
    assert "already used" in reasons["A"] and "not a resolution" in reasons["b"]
    assert "names no file" in reasons["c"]
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("slide_file\nx.svs\n")
    with pytest.raises(HistopilotError, match="needs a column 'path' or 'slide'"):
        read_cohort([wrong], "index")


def test_an_output_folder_is_never_mixed_or_clobbered(manifest, options, tmp_path, local_run):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds no earlier batch run"):
        run_cohort([manifest], options, occupied)
    out, _, _ = local_run
    other = options.model_copy(update={"shards": 2})
    with pytest.raises(OutputError, match="other settings"):
        run_cohort([manifest], other, out)
    assert (occupied / "notes.txt").read_text() == "mine"
