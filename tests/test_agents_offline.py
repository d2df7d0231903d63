"""The offline strategy end to end on real slides, and the parts it is built from."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histopilot.agents.describe import FEATURE_RULES, rule_votes
from histopilot.agents.diagnose import posterior_differential
from histopilot.agents.measure import measure_region
from histopilot.agents.mil import AttentionMIL, MILHeadConfig, load_mil_head
from histopilot.agents.outputs import write_outputs
from histopilot.agents.state import Finding, Measurements, Region
from histopilot.agents.triage import triage_maps
from histopilot.errors import ConfigError, ImageInputError, MissingMPPError
from histopilot.retrieval.features import SlideFeatures
from histopilot.retrieval.reference import ReferenceBank, read_labels
from histopilot.slide import open_slide
from tests.agent_helpers import analyse, make_context


def crc_patches(test_data: Path) -> dict[str, list[np.ndarray]]:
    folder = test_data / "patches" / "crc_val_he_7k"
    by_label: dict[str, list[np.ndarray]] = {}
    with (folder / "labels.csv").open() as handle:
        for row in csv.DictReader(handle):
            image = np.asarray(Image.open(folder / row["file"]).convert("RGB"))
            by_label.setdefault(row["label"], []).append(image)
    return by_label


def check_outputs(run, context, out: Path) -> dict:
    """The four outputs exist, agree with each other, and cite only visited tissue."""
    workspace = context.workspace(run.state["slide"])
    files = write_outputs(run.state, workspace, out, thread_id=run.thread_id, audit=run.audit)
    regions = run.state["regions"]
    for region in regions.values():
        side = min(region.width, region.height)
        tissue = workspace.tissue.fractions(np.array([region.x]), np.array([region.y]), side)[0]
        assert tissue > 0, f"{region.id} lies outside the tissue"
    report = run.state["report"]
    cited = {c.region_id for statement in report.findings for c in statement.citations}
    assert cited and cited <= set(regions)
    for statement in report.findings:
        for citation in statement.citations:
            assert citation.x == regions[citation.region_id].x
    geojson = json.loads(Path(files.regions).read_text())
    assert [f["properties"]["name"] for f in geojson["features"]] == sorted(regions)
    assert geojson["features"][0]["properties"]["objectType"] == "annotation"
    record = json.loads(Path(files.analysis).read_text())
    assert set(record["regions"]) == set(regions)
    assert record["diagnosis"]["statement"] == report.diagnosis
    markdown = Path(files.report).read_text()
    assert "not a diagnosis" in markdown and report.diagnosis in markdown
    with Image.open(files.overlay) as overlay:
        assert max(overlay.size) == 1600
    return record


def test_offline_analysis_of_an_aperio_slide_with_a_reference_bank(
    wsi_dir: Path, feature_cache: Path, reference_bank_path: Path, tmp_path: Path
) -> None:
    context = make_context(feature_cache, reference=reference_bank_path, budget=8)
    run = analyse(wsi_dir / "CMU-1-Small-Region.svs", context)
    record = check_outputs(run, context, tmp_path / "out")
    differential = run.state["differential"]
    assert differential.method.startswith("reference k-NN")
    assert {h.label for h in differential.hypotheses} == set(
        ReferenceBank.open(reference_bank_path).labels
    )
    assert sum(h.probability for h in differential.hypotheses) == pytest.approx(1, abs=0.01)
    assert all(h.interval[0] <= h.probability <= h.interval[1] for h in differential.hypotheses)
    evidence = run.state["evidence"].values()
    assert {e.kind for e in evidence} == {"reference"}
    assert all(e.region_id in run.state["regions"] for e in evidence)
    assert record["triage"]["method"] == "heuristic"
    powers = {r.magnification for r in run.state["regions"].values()}
    assert powers >= {"low", "high"}  # surveyed at low power, confirmed at high


def test_offline_analysis_of_a_jpeg2000_tcga_slide_without_a_bank(
    wsi_dir: Path, feature_cache: Path, tmp_path: Path
) -> None:
    slide = wsi_dir / "tcga-cr-7395-01a-01-ts1.svs"
    with pytest.raises(MissingMPPError, match="--slide-mpp"):  # the file declares no µm/px
        analyse(slide, make_context(feature_cache))
    # Lymphocyte nuclei (~7 µm) span ~7 px here: about 1 µm/px, a 10x export.
    context = make_context(feature_cache, budget=6, slide_mpp=1.0)
    run = analyse(slide, context)
    check_outputs(run, context, tmp_path / "out")
    differential = run.state["differential"]
    assert differential.method.startswith("feature rules")
    assert "no reference bank" in differential.note
    assert {h.label for h in differential.hypotheses} <= set(FEATURE_RULES)
    high = [
        run.state["findings"][r.id]
        for r in run.state["regions"].values()
        if r.magnification == "high"
    ]
    assert high and all(f.measurements.nuclei_per_mm2 is not None for f in high)


def test_measurements_tell_lymphoid_from_stroma_and_mucin(test_data: Path) -> None:
    patches = crc_patches(test_data)

    def mean_cellularity(label: str) -> float:
        return float(np.mean([measure_region(p, 0.5).cellularity for p in patches[label]]))

    assert mean_cellularity("LYM") > mean_cellularity("STR") > mean_cellularity("MUC")
    tumour = [measure_region(p, 0.5) for p in patches["TUM"]]
    lymphoid = [measure_region(p, 0.5) for p in patches["LYM"]]
    assert np.median([m.nuclear_area_um2 for m in tumour]) > np.median(
        [m.nuclear_area_um2 for m in lymphoid]
    )
    low_power = measure_region(patches["LYM"][0], 2.0)
    assert low_power.nuclei_per_mm2 is None and low_power.cellularity is None
    glass = measure_region(np.full((64, 64, 3), 250, np.uint8), 0.5)
    assert glass.tissue_fraction == 0 and glass.nuclei_per_mm2 is None


def test_feature_rules_call_dense_atypical_tissue_and_sparse_tissue(test_data: Path) -> None:
    patches = crc_patches(test_data)

    def top(label: str) -> list[str]:
        votes = [rule_votes(measure_region(p, 0.5)) for p in patches[label]]
        assert all(sum(v.values()) == pytest.approx(1, abs=1e-3) for v in votes)
        return [max(v, key=v.get) for v in votes]

    # Coarse rules on noisy measurements: they separate the clear cases, which is all the
    # no-bank fallback claims.
    assert top("TUM").count("cellular-atypical") >= 2
    assert top("STR") == ["stroma"] * 4
    assert top("MUC").count("sparse") >= 3
    assert rule_votes(Measurements(tissue_fraction=0.01, hematoxylin=0, eosin=0)) == {}


def test_more_concordant_regions_make_the_differential_surer() -> None:
    def finding(i: int) -> Finding:
        return Finding(
            region_id=f"T1.{i:02d}",
            text="",
            measurements=Measurements(tissue_fraction=1.0, hematoxylin=0.3, eosin=0.2),
            votes={"TUM": 0.7, "STR": 0.3},
            suspicion=0.5,
            source="measured",
        )

    def region(i: int) -> Region:
        return Region(
            id=f"T1.{i:02d}",
            x=0,
            y=0,
            width=8,
            height=8,
            magnification="high",
            trajectory=1,
            step=i,
        )

    names = {"TUM": "tumour", "STR": "stroma", "ADI": "adipose"}
    confidences = []
    for count in (1, 4, 12):
        findings = [finding(i) for i in range(1, count + 1)]
        regions = {f.region_id: region(i) for i, f in enumerate(findings, 1)}
        result = posterior_differential(
            findings, regions, names, method="test", rng=np.random.default_rng(0)
        )
        assert result.top.label == "TUM"
        assert result.top.support == sorted(regions)
        confidences.append(result.confidence)
    assert confidences[0] < confidences[1] < confidences[2]
    assert confidences[2] > 0.9


def test_labels_come_from_a_csv_or_file_names_and_stay_inside_the_folder(
    test_data: Path, tmp_path: Path
) -> None:
    folder = test_data / "patches" / "crc_val_he_7k"
    labelled = read_labels(folder, None)
    assert len(labelled) == 32 and {item.label for item in labelled} >= {"TUM", "LYM"}
    assert {item.name for item in labelled if item.label == "TUM"} == {
        "colorectal adenocarcinoma epithelium"
    }
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (8, 8)).save(loose / "TUM_0001.png")
    assert [item.label for item in read_labels(loose, None)] == ["TUM"]
    hostile = tmp_path / "hostile.csv"
    hostile.write_text("file,label\n../../etc/passwd,TUM\n")
    with pytest.raises(ImageInputError, match="outside"):
        read_labels(loose, hostile)
    missing_column = tmp_path / "bad.csv"
    missing_column.write_text("name,class\nTUM_0001.png,TUM\n")
    with pytest.raises(ImageInputError, match="'file' and 'label'"):
        read_labels(loose, missing_column)


def test_reference_votes_find_each_class(test_data: Path, reference_bank_path: Path) -> None:
    from histopilot.retrieval.encoders import load_encoder

    bank = ReferenceBank.open(reference_bank_path, k=5)
    encoder = load_encoder("offline")
    patches = crc_patches(test_data)
    for label, images in patches.items():
        votes = bank.votes(encoder.encode_images(images))
        assert np.allclose(votes.sum(1), 1)
        assert bank.labels[int(votes.mean(0).argmax())] == label
    assert bank.label_for("look for colorectal adenocarcinoma epithelium") == "TUM"
    assert bank.label_for("LYM") == "LYM"
    assert bank.label_for("mitoses") is None
    assert bank.label_for("cancer") is None  # not "cancer-associated stroma"


def test_a_trained_mil_head_drives_triage(wsi_dir: Path, tmp_path: Path) -> None:
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as slide:
        features = SlideFeatures(
            slide_id="s",
            slide_path=str(slide.path),
            encoder="offline",
            features=np.random.default_rng(0).normal(size=(20, 205)).astype(np.float32),
            coords=np.stack([np.arange(20) * 448, np.zeros(20, int)], 1),
            size_level0=448,
            mpp=0.5,
        )
        head = AttentionMIL(
            MILHeadConfig(encoder="offline", in_dim=205, classes=["benign", "malignant"])
        )
        loaded = load_mil_head(head.save(tmp_path / "head"))

        class Offline:  # the triage call only reads these from the encoder
            name, has_text = "offline", False

        maps = triage_maps(slide, features, Offline(), mil_head=loaded)
        assert maps.method == "mil"
        assert 0 <= maps.risk <= 1
        assert maps.importance.max() == pytest.approx(1.0)
        risk, importance = head.score(features.features)
        assert maps.risk == pytest.approx(risk) and np.allclose(maps.importance, importance)

        class Other:
            name, has_text = "uni", False

        with pytest.raises(ConfigError, match="trained on 'offline'"):
            triage_maps(slide, features, Other(), mil_head=loaded)
    with pytest.raises(ConfigError, match="no triage head"):
        load_mil_head(tmp_path / "missing")


def test_zero_shot_triage_with_a_text_tower(wsi_dir: Path, tmp_path: Path) -> None:
    from histopilot.retrieval.encoders import load_encoder
    from tests.tiny_encoders import save_tiny_open_clip

    encoder = load_encoder(f"open_clip:local-dir:{save_tiny_open_clip(tmp_path / 'clip')}")
    vectors = encoder.encode_images(
        [np.full((32, 32, 3), shade, np.uint8) for shade in range(40, 240, 20)]
    )
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as slide:
        features = SlideFeatures(
            slide_id="s",
            slide_path=str(slide.path),
            encoder=encoder.name,
            features=vectors,
            coords=np.stack([np.arange(len(vectors)) * 64, np.zeros(len(vectors), int)], 1),
            size_level0=64,
            mpp=0.5,
        )
        maps = triage_maps(slide, features, encoder)
    assert maps.method == "zero-shot"
    assert maps.importance.shape == (len(vectors),)
    assert np.all((maps.importance >= 0) & (maps.importance <= 1))


def test_fields_are_read_at_their_power_with_or_without_the_slide_plane(
    wsi_dir: Path, feature_cache: Path, monkeypatch
) -> None:
    from histopilot.agents import context as context_module
    from histopilot.errors import RegionError

    workspace = make_context(feature_cache).workspace(wsi_dir / "CMU-1-Small-Region.svs")
    box = (0, 896, 1792, 1792)  # a low-power field, level-0 pixels at ~0.5 µm/px
    from_plane = workspace.read(*box, mpp=2.0)
    monkeypatch.setattr(context_module, "PLANE_MAX_PIXELS", 0)
    direct = workspace.read(*box, mpp=2.0)
    side = round(1792 * workspace.slide.mpp.mean / 2.0)  # 447 px: the scan is 0.499 µm/px
    assert from_plane.shape == direct.shape == (side, side, 3)
    assert np.abs(from_plane.astype(int) - direct.astype(int)).mean() < 8
    high = round(448 * workspace.slide.mpp.mean / 0.5)
    assert workspace.read(448, 896, 448, 448, mpp=0.5).shape == (high, high, 3)
    with pytest.raises(RegionError, match="not inside the slide"):
        workspace.read(2000, 2800, 448, 448, mpp=0.5)


def test_zooming_works_up_to_the_slide_edge(wsi_dir: Path, feature_cache: Path) -> None:
    from histopilot.agents.navigate import candidates

    workspace = make_context(feature_cache).workspace(wsi_dir / "CMU-1-Small-Region.svs")
    width, height = workspace.slide.dimensions  # 2220 × 2967: the last tiles are cut off
    edge = Region(
        id="T1.01",
        x=448,
        y=1344,
        width=width - 448,
        height=height - 1344,
        magnification="low",
        trajectory=1,
        step=1,
    )
    medium = candidates(workspace, "medium", [edge], relevance=None)
    inside = [c for c in medium if c.column * 224 >= edge.x and c.row * 224 >= edge.y]
    assert inside and all(c.parent == "T1.01" for c in inside)


def test_the_chat_clips_boxes_to_the_slide_and_refuses_huge_ones(
    wsi_dir: Path, feature_cache: Path
) -> None:
    from histopilot.agents.chat import chat_region
    from histopilot.errors import RegionError

    workspace = make_context(feature_cache).workspace(wsi_dir / "CMU-1-Small-Region.svs")
    region = chat_region(workspace, (2000, -50, 448, 448), "high", number=1)
    assert (region.x, region.y, region.width, region.height) == (2000, 0, 220, 398)
    with pytest.raises(RegionError, match="outside the slide"):
        chat_region(workspace, (5000, 5000, 100, 100), "high", number=1)
    with pytest.raises(RegionError, match="at most"):
        chat_region(workspace, (0, 0, 2220, 2967), "low", number=1)


def test_the_diagnoser_cites_knowledge_about_its_leading_hypothesis(
    wsi_dir: Path,
    feature_cache: Path,
    reference_bank_path: Path,
    test_data: Path,
    tmp_path: Path,
) -> None:
    from histopilot.retrieval.kb import KnowledgeBase, load_oncotree

    tree = load_oncotree(test_data / "knowledge" / "oncotree_2025_10_03.json")
    knowledge = KnowledgeBase.build(tree[:100], tmp_path / "kb")  # a slice keeps it quick
    context = make_context(feature_cache, reference=reference_bank_path, budget=5, trajectories=1)
    context.knowledge = knowledge
    run = analyse(wsi_dir / "CMU-1-Small-Region.svs", context)
    cited = [e for e in run.state["evidence"].values() if e.kind == "knowledge"]
    assert cited and all(e.id.startswith("kb:oncotree:") for e in cited)
    assert all(e.source.startswith("oncotree_2025_10_03.json:") for e in cited)
    report = run.state["report"]
    assert {e.id for e in report.evidence} & {e.id for e in cited}
