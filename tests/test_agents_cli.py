"""``histopilot analyze``, ``chat`` and ``index images`` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from histopilot.cli import app

runner = CliRunner()


@pytest.fixture
def isolated(isolated_config, feature_cache: Path, monkeypatch) -> None:
    """No user config; tile embeddings cached for the session; threads in the test folder."""
    monkeypatch.setenv("HISTOPILOT_AGENTS__FEATURE_CACHE", str(feature_cache))
    monkeypatch.setenv("XDG_DATA_HOME", str(Path.cwd() / "user-data"))


def test_analyze_writes_its_outputs_and_an_audit_trail(
    wsi_dir: Path, isolated, tmp_path: Path
) -> None:
    out = tmp_path / "analysis"
    result = runner.invoke(
        app,
        [
            "analyze",
            str(wsi_dir / "CMU-1-Small-Region.svs"),
            "--out",
            str(out),
            "--budget",
            "5",
            "--trajectories",
            "2",
            "--seed",
            "1",
            "--question",
            "is there tumour?",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {Path(f).name for f in summary["outputs"].values()} == {
        "report.md",
        "analysis.json",
        "overlay.png",
        "regions.geojson",
        "audit.json",
    }
    record = json.loads((out / "analysis.json").read_text())
    assert record["question"] == "is there tumour?"
    assert record["thread_id"] == summary["thread_id"]
    assert len(record["trajectories"]) == 2
    assert summary["regions"] == len(record["regions"]) <= 10
    assert "trajectory 1" in result.stderr  # progress streamed to the terminal

    # The audit trail, read back from the checkpoint database beside the outputs.
    shown = runner.invoke(app, ["audit", str(out), "--json"])
    assert shown.exit_code == 0, shown.output
    (audit,) = json.loads(shown.stdout)["records"]
    assert audit == json.loads((out / "audit.json").read_text())["records"][0]
    assert audit["id"] == f"{summary['thread_id']}#1" and audit["kind"] == "analysis"
    provenance = audit["provenance"]
    assert {m["role"] for m in provenance["models"]} == {
        "orchestrator",
        "describer",
        "diagnoser",
        "reporter",
    }
    assert all(m["backend"] == "offline" for m in provenance["models"])
    assert set(provenance["prompts"]) >= {"describe", "diagnose", "report", "chat"}
    assert len(provenance["config_hash"]) == 16 and provenance["settings"]["seed"] == 1
    assert provenance["encoder"].startswith("offline") and provenance["remote"] == []
    steps = {call["name"] for call in audit["tool_calls"]}
    assert steps == {"triage", "navigate", "describe"}
    described = [c for c in audit["tool_calls"] if c["name"] == "describe"]
    assert {c["inputs"]["region"] for c in described} == set(record["regions"])
    assert all(c["outputs"][0] == "measured" for c in described)
    assert audit["regions"] == sorted(record["regions"])
    assert {"triage", "describe", "diagnose", "report"} <= set(audit["timings"])
    assert audit["material"]["stain"] == "H&E" and audit["input_sha256"]
    table = runner.invoke(app, ["audit", str(out)])
    assert summary["thread_id"] in table.stdout and "prompts" in table.stderr


def test_analyze_refuses_to_overwrite_a_folder_it_did_not_write(
    wsi_dir: Path, isolated, tmp_path: Path
) -> None:
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.docx").write_text("years of work")
    result = runner.invoke(
        app, ["analyze", str(wsi_dir / "CMU-1-Small-Region.svs"), "--out", str(out)]
    )
    assert result.exit_code == 2
    assert "not empty" in result.stderr
    assert (out / "chapter1.docx").read_text() == "years of work"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("hamamatsu-test3-DAPI-2-387.ndpi", "brightfield"),
        ("tcga-cr-7395-01a-01-ts1.svs", "--slide-mpp"),
        ("no-such-slide.svs", "no slide"),
    ],
)
def test_analyze_explains_slides_it_cannot_read(
    wsi_dir: Path, isolated, tmp_path: Path, name: str, message: str
) -> None:
    result = runner.invoke(app, ["analyze", str(wsi_dir / name), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_a_reference_bank_from_labelled_images_feeds_the_differential(
    test_data: Path, wsi_dir: Path, isolated, tmp_path: Path
) -> None:
    bank = tmp_path / "bank"
    built = runner.invoke(
        app,
        [
            "index",
            "images",
            str(test_data / "patches" / "crc_val_he_7k"),
            "--out",
            str(bank),
            "--json",
        ],
    )
    assert built.exit_code == 0, built.output
    classes = ("ADI", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
    assert json.loads(built.stdout)["labels"] == dict.fromkeys(classes, 4)
    result = runner.invoke(
        app,
        [
            "analyze",
            str(wsi_dir / "CMU-1-Small-Region.svs"),
            "--out",
            str(tmp_path / "a"),
            "--reference",
            str(bank),
            "--budget",
            "5",
            "--trajectories",
            "1",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert record["differential"]["method"].startswith("reference k-NN")


def test_review_at_the_terminal_approves_the_report(
    wsi_dir: Path, isolated, tmp_path: Path
) -> None:
    out = tmp_path / "reviewed"
    result = runner.invoke(
        app,
        [
            "analyze",
            str(wsi_dir / "CMU-1-Small-Region.svs"),
            "--out",
            str(out),
            "--budget",
            "5",
            "--trajectories",
            "1",
            "--review",
        ],
        input="y\nconcordant with my read\n",
    )
    assert result.exit_code == 0, result.output
    assert "Approve this draft?" in result.stderr
    report = (out / "report.md").read_text()
    assert "Status: reviewed (concordant with my read)" in report


def test_offline_chat_commands_and_a_resumed_thread(wsi_dir: Path, isolated) -> None:
    slide = str(wsi_dir / "CMU-1-Small-Region.svs")
    first = runner.invoke(
        app,
        ["chat", slide, "--thread", "case-7"],
        input="/analyze\n/regions\n/report\nIs there carcinoma?\n/describe T1.01\n/quit\n",
    )
    assert first.exit_code == 0, first.output
    assert "thread case-7" in first.stdout
    assert "T1.01" in first.stdout and "low" in first.stdout  # the regions table
    assert "## Differential" in first.stdout  # the report
    assert "Offline mode" in first.stdout  # free text, offline: read from the analysis
    assert "T1.01: low-power field" in first.stdout

    resumed = runner.invoke(app, ["chat", slide, "--thread", "case-7"], input="/regions\n")
    assert resumed.exit_code == 0, resumed.output
    assert "T1.01" in resumed.stdout

    # Each turn has its audit record, and the analysis the first turn ran has its own.
    audit = json.loads(runner.invoke(app, ["audit", "case-7", "--json"]).stdout)["records"]
    turns = [r for r in audit if r["kind"] == "chat_turn"]
    assert [r["id"] for r in turns] == [f"case-7#turn-{n}" for n in range(1, 7)]
    (analysis,) = [r for r in audit if r["kind"] == "analysis"]
    assert turns[0]["analyses"] == [analysis["thread_id"]]
    assert analysis["thread_id"].startswith("case-7:analysis:")

    other = wsi_dir / "tcga-cr-7395-01a-01-ts1.svs"
    wrong = runner.invoke(
        app, ["chat", str(other), "--thread", "case-7", "--mpp", "1"], input="/quit\n"
    )
    assert wrong.exit_code == 2
    assert "is about" in wrong.stderr


@pytest.mark.parametrize(
    ("option", "message"),
    [(["--seed", "-1"], "seed"), (["--trajectories", "100"], "trajectories")],
)
def test_out_of_range_settings_are_explained(
    wsi_dir: Path, isolated, tmp_path: Path, option: list[str], message: str
) -> None:
    result = runner.invoke(
        app,
        ["analyze", str(wsi_dir / "CMU-1-Small-Region.svs"), "--out", str(tmp_path / "o"), *option],
    )
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
