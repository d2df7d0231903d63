"""The command line as a user runs it: JSON output, files written, clean errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from PIL import Image
from typer.testing import CliRunner

from histopilot.cli import app
from tests.test_open_slide import SHARED_SLIDES

runner = CliRunner()


@pytest.mark.parametrize("name", sorted(SHARED_SLIDES))
def test_slide_info_json_for_every_shared_slide(wsi_dir: Path, name: str) -> None:
    result = runner.invoke(app, ["slide", "info", str(wsi_dir / name), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    _, fmt, (width, height), levels, mpp, _, _ = SHARED_SLIDES[name]
    assert (info["format"], info["width"], info["height"]) == (fmt, width, height)
    assert len(info["levels"]) == levels
    assert (info["mpp"] is None) == (mpp is None)


def test_slide_mpp_option_supplies_a_missing_resolution(wsi_dir: Path) -> None:
    path = wsi_dir / "tcga-cr-7395-01a-01-ts1.svs"
    result = runner.invoke(app, ["slide", "info", str(path), "--mpp", "0.5", "--json"])
    assert json.loads(result.stdout)["mpp"] == {"x": 0.5, "y": 0.5, "source": "user"}


def test_tissue_writes_mask_and_geojson(wsi_dir: Path, tmp_path: Path) -> None:
    mask, geojson = tmp_path / "mask.png", tmp_path / "regions.geojson"
    result = runner.invoke(
        app,
        [
            "slide",
            "tissue",
            str(wsi_dir / "CMU-1-Small-Region.svs"),
            "--out",
            str(mask),
            "--geojson",
            str(geojson),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert 0.25 < summary["tissue_fraction"] < 0.5
    assert summary["tissue_area_mm2"] > 0.1
    assert Image.open(mask).mode == "L"
    assert json.loads(geojson.read_text())["type"] == "FeatureCollection"


def test_tiles_writes_coordinates_and_images(wsi_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "slide",
            "tiles",
            str(wsi_dir / "CMU-1-Small-Region.svs"),
            "--mpp",
            "0.5",
            "--size",
            "256",
            "--out",
            str(tmp_path),
            "--min-tissue",
            "0.5",
            "--save-images",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    with h5py.File(summary["coords"]) as handle:
        assert handle["coords"].shape == (summary["tiles"], 2)
    pngs = sorted(Path(summary["images"]).glob("x*_y*.png"))
    assert len(pngs) == summary["tiles"] > 20
    assert Image.open(pngs[0]).size == (256, 256)


def test_thumbnail_is_written_at_the_asked_size(wsi_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "thumb.png"
    path = wsi_dir / "dicom-wsi-TCGA-XK-AAJU-01A-01-TS1-level.dcm"
    result = runner.invoke(
        app, ["slide", "thumbnail", str(path), "--out", str(out), "--size", "512"]
    )
    assert result.exit_code == 0, result.output
    assert max(Image.open(out).size) == 512


def test_demo_runs_the_offline_analysis_on_a_fresh_folder(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tissue_tiles"] > 20
    assert 0 < summary["regions"] < summary["tissue_tiles"]
    assert "not a diagnosis" in summary["notice"]
    assert sorted(summary["outputs"]) == ["analysis", "audit", "overlay", "regions", "report"]
    for output in summary["outputs"].values():
        assert Path(output).stat().st_size > 0


@pytest.mark.parametrize(
    ("content", "name", "command"),
    [
        (None, "missing.svs", ["slide", "info"]),
        (b"", "empty.svs", ["slide", "info"]),
        (b"random bytes" * 100, "random.svs", ["slide", "tissue", "--out", "m.png"]),
        (b"hello", "notes.txt", ["slide", "thumbnail", "--out", "t.png"]),
    ],
)
def test_user_errors_exit_2_without_traceback(
    tmp_path: Path, content: bytes | None, name: str, command: list[str]
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    args = [*command[:2], str(path), *command[2:]]
    process = subprocess.run(
        [sys.executable, "-m", "histopilot", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert process.returncode == 2
    assert "error:" in process.stderr
    assert "Traceback" not in process.stderr


def test_missing_mpp_error_names_the_option(wsi_dir: Path, tmp_path: Path) -> None:
    path = wsi_dir / "tcga-cr-7395-01a-01-ts1.svs"
    result = runner.invoke(app, ["slide", "tiles", str(path), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "--slide-mpp" in result.output


def test_fluorescence_tissue_is_refused_with_exit_2(wsi_dir: Path, tmp_path: Path) -> None:
    path = wsi_dir / "vectra-polaris-3ch-small.qptiff"
    result = runner.invoke(app, ["slide", "tissue", str(path), "--out", str(tmp_path / "m.png")])
    assert result.exit_code == 2
    assert "fluorescence" in result.output


def test_tiles_of_a_dicom_folder_named_dotdot_stay_inside_out(
    wsi_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    series = tmp_path / "series"
    (series / "work").mkdir(parents=True)
    (series / "level.dcm").write_bytes(
        (wsi_dir / "dicom-wsi-TCGA-XK-AAJU-01A-01-TS1-level.dcm").read_bytes()
    )
    monkeypatch.chdir(series / "work")
    result = runner.invoke(
        app,
        [
            "slide",
            "tiles",
            "..",
            "--out",
            "tiles",
            "--slide-mpp",
            "0.5",
            "--mpp",
            "4",
            "--min-tissue",
            "0",
            "--save-images",
        ],
    )
    assert result.exit_code == 0, result.output
    assert not list((series / "work").glob("*.png"))
    assert not list(series.glob("*.png"))
    assert (series / "work" / "tiles" / "series.h5").exists()
    assert list((series / "work" / "tiles" / "series").glob("x*_y*.png"))
