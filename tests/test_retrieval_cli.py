"""`histopilot index …`, `histopilot search` and the retrieval tools on the shared slides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from histopilot.cli import app
from histopilot.retrieval.encoders import load_encoder
from histopilot.retrieval.kb import KnowledgeBase
from histopilot.retrieval.patch_index import PatchIndex
from histopilot.retrieval.tools import retrieval_tools

runner = CliRunner()


def run(*args: str) -> tuple[int, str]:
    """Exit code, and stdout on success (where --json goes) or everything on failure."""
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout if result.exit_code == 0 else result.output


@pytest.fixture(scope="module")
def index_dir(wsi_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "index"
    code, output = run(
        "index",
        "build",
        wsi_dir / "CMU-1-Small-Region.svs",
        "--out",
        out,
        "--label",
        "CMU-1",
        "--json",
    )
    assert code == 0, output
    summary = json.loads(output)
    assert summary["encoder"] == "offline" and summary["added"] == {"CMU-1-Small-Region": 49}
    code, output = run(
        "index", "add", out, wsi_dir / "tcga-cr-7395-01a-01-ts1.svs", "--slide-mpp", "0.5", "--json"
    )
    assert code == 0, output
    assert (out / "features" / "tcga-cr-7395-01a-01-ts1.h5").is_file()
    return out


def test_index_info_lists_the_slides(index_dir: Path) -> None:
    code, output = run("index", "info", index_dir, "--json")
    info = json.loads(output)
    assert (
        code == 0
        and info["kind"] == "flat"
        and info["count"] == sum(slide["patches"] for slide in info["slides"])
    )
    assert [slide["label"] for slide in info["slides"]] == ["CMU-1", None]


def test_search_by_image_region_and_slide(index_dir: Path, wsi_dir: Path, test_data: Path) -> None:
    patch = test_data / "patches" / "crc_val_he_7k" / "TUM-TCGA-DRHQMTQA.png"
    code, output = run("search", index_dir, "--image", patch, "-k", "3", "--json")
    assert code == 0, output
    hits = json.loads(output)["patches"]
    assert [hit["rank"] for hit in hits] == [1, 2, 3]
    assert {"slide_id", "slide_path", "x", "y", "size", "mpp", "score"} <= hits[0].keys()

    slide = wsi_dir / "CMU-1-Small-Region.svs"
    indexed = PatchIndex.open(index_dir)
    cmu = indexed.search(indexed.vectors([0]), k=1)  # the first patch of the first slide
    region = f"{cmu[0][0].x},{cmu[0][0].y},{cmu[0][0].size},{cmu[0][0].size}"
    code, output = run("search", index_dir, "--slide", slide, "--region", region, "--json")
    assert code == 0, output
    best = json.loads(output)["patches"][0]
    assert (best["slide_id"], best["x"], best["y"]) == (
        "CMU-1-Small-Region",
        cmu[0][0].x,
        cmu[0][0].y,
    )

    code, output = run("search", index_dir, "--slide", slide, "--json")
    assert code == 0, output
    assert [hit["slide_id"] for hit in json.loads(output)["slides"]] == ["tcga-cr-7395-01a-01-ts1"]


def test_remove_and_rebuild(index_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for part in ("manifest.json", "metadata.sqlite", "vectors.faiss"):
        (copy / part).write_bytes((index_dir / part).read_bytes())
    code, output = run("index", "remove", copy, "tcga-cr-7395-01a-01-ts1.svs")
    assert code == 2 and "without their suffix" in output
    code, output = run("index", "remove", copy, "tcga-cr-7395-01a-01-ts1", "--json")
    assert code == 0 and json.loads(output)["patches"] == 49
    code, output = run("index", "rebuild", copy, "--kind", "hnsw", "--json")
    assert code == 0 and json.loads(output)["kind"] == "hnsw"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--text", "tumour"], "no text tower"),
        (["--image", "{README}"], "not an image"),
        (["--image", "missing.png"], "no image file"),
        (["--region", "1,2,3,4"], "a region needs the slide"),
        (["--slide", "{SLIDE}", "--region", "1,2"], "x,y,w,h"),
        ([], "exactly one query"),
    ],
)
def test_search_mistakes_are_one_line_errors(index_dir: Path, wsi_dir: Path, args, message) -> None:
    readme = Path(__file__).parents[1] / "README.md"
    slide = wsi_dir / "CMU-1-Small-Region.svs"
    args = [a.replace("{README}", str(readme)).replace("{SLIDE}", str(slide)) for a in args]
    code, output = run("search", index_dir, *args)
    assert code == 2 and message in output and "Traceback" not in output


def test_a_failed_build_leaves_nothing_behind(wsi_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    code, output = run(
        "index",
        "build",
        wsi_dir / "CMU-1-Small-Region.svs",
        wsi_dir / "tcga-cr-7395-01a-01-ts1.svs",
        "--out",
        out,
    )
    assert code == 2 and "--slide-mpp" in output  # the second slide declares no resolution
    assert list(tmp_path.iterdir()) == []
    thesis = tmp_path / "thesis" / "chapter1.md"
    thesis.parent.mkdir()
    thesis.write_text("months of work")
    code, output = run("index", "build", wsi_dir / "CMU-1-Small-Region.svs", "--out", thesis.parent)
    assert code == 2 and "not empty" in output and thesis.read_text() == "months of work"
    code, output = run(
        "index", "build", wsi_dir / "CMU-1-Small-Region.svs", "--out", out, "--encoder", "nope"
    )
    assert code == 2 and "unknown encoder" in output


def test_retrieval_tools_answer_agents_with_citable_patches(
    index_dir: Path, test_data: Path
) -> None:
    index = PatchIndex.open(index_dir)
    tools = {
        tool.name: tool
        for tool in retrieval_tools(patch_index=index, encoder=load_encoder("offline"))
    }
    assert set(tools) == {"search_similar_patches", "search_similar_slides"}
    patch = test_data / "patches" / "crc_val_he_7k" / "STR-TCGA-HGDYLEWM.png"
    call = {
        "name": "search_similar_patches",
        "args": {"image_path": str(patch), "k": 2},
        "id": "1",
        "type": "tool_call",
    }
    message = tools["search_similar_patches"].invoke(call)
    assert len(message.artifact.hits) == 2 and json.loads(message.content)["hits"][0]["rank"] == 1
    failed = tools["search_similar_patches"].invoke(call | {"args": {"image_path": "/nope.png"}})
    assert failed.content.startswith("error: no image file") and failed.artifact is None
    invalid = tools["search_similar_patches"].invoke(
        call | {"args": {"text": "x", "image_path": str(patch)}}
    )
    assert "exactly one" in invalid.content


def test_kb_build_and_query_cite_their_sources(test_data: Path, tmp_path: Path) -> None:
    notes = tmp_path / "grading.md"
    notes.write_text(
        "# Nottingham grade\n\nTubule formation, nuclear pleomorphism and mitotic count are "
        "each scored 1 to 3; the sum gives grade 1 (3-5), 2 (6-7) or 3 (8-9).\n"
    )
    oncotree = test_data / "knowledge" / "oncotree_2025_10_03.json"
    code, output = run("kb", "build", oncotree, notes, "--out", tmp_path / "kb", "--json")
    assert code == 0, output
    assert json.loads(output)["kinds"] == {
        "oncotree": 897,
        "document": 1,
    }  # the root "Tissue" node is no passage

    code, output = run("kb", "query", tmp_path / "kb", "lung adenocarcinoma", "-k", "3", "--json")
    assert code == 0, output
    codes = [hit["passage"]["source"]["code"] for hit in json.loads(output)["hits"]]
    assert "LUAD" in codes  # beside its in-situ and subtype nodes (LAIS, …)

    knowledge = KnowledgeBase.open(tmp_path / "kb")
    [tool] = retrieval_tools(knowledge=knowledge)
    call = {"name": tool.name, "args": {"query": "Nottingham grading criteria", "k": 1}}
    message = tool.invoke(call | {"id": "1", "type": "tool_call"})
    source = message.artifact.passages[0].passage.source
    assert (source.kind, source.file, source.char_start) == ("document", "grading.md", 0)

    code, output = run("kb", "query", tmp_path / "kb", "x", "--mode", "fuzzy")
    assert code == 2 and "unknown search mode" in output
    code, output = run("kb", "build", tmp_path / "missing.obo", "--out", tmp_path / "kb2")
    assert code == 2 and not (tmp_path / "kb2").exists()
