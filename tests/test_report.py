"""Synoptic reports: drafting from an analysis, rendering, FHIR export and the report commands."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle
from langgraph.types import Command
from typer.testing import CliRunner

from histopilot.agents.checkpoints import open_checkpointer, serializer
from histopilot.agents.graph import compile_analysis
from histopilot.agents.outputs import analysis_record, report_markdown
from histopilot.agents.state import ReportDraft
from histopilot.cli import app
from histopilot.tools.report import (
    SCHEMAS,
    Citation,
    Reported,
    SynopticBase,
    SynopticReport,
    grounded_elements,
    measured_elements,
    render,
    schema_for,
    to_fhir,
)
from histopilot.tools.report.render import GROUPS
from histopilot.tools.report.schemas import BreastInvasive, Colorectal, GenericSite
from tests.agent_helpers import analyse, make_context
from tests.fake_models import ScriptedChatModel

runner = CliRunner()
REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE = (
    "Invasive ductal carcinoma, Nottingham grade 2, 23 mm, left breast. "
    "Margins negative. pT2 pN1a (2/14 lymph nodes). ER positive (90%)."
)


def drafted(**overrides) -> SynopticReport:
    """What the agents draft for a confident colorectal read of two regions."""
    elements = measured_elements("colorectal adenocarcinoma epithelium", ["T1.04", "T2.02"])
    fields = {
        "id": "analysis-0123",
        "title": "Slide CRC-7: analysis draft",
        "slide_id": "CRC-7",
        "elements": elements,
        "diagnosis": "The examined fields most resemble colorectal adenocarcinoma epithelium.",
        "narrative": "Glands of atypical columnar epithelium in two fields.",
        "limitations": ["6 fields examined over 2 trajectories."],
        "citations": [
            Citation(region_id="T1.04", x=0, y=0, width=448, height=448, magnification="high"),
            Citation(region_id="T2.02", x=448, y=0, width=896, height=896, magnification="medium"),
        ],
        "notice": "Heuristic analysis; not a diagnosis. Draft for review by a pathologist.",
        "created": datetime(2025, 3, 4, 10, 30, tzinfo=UTC),
    }
    return SynopticReport(**(fields | overrides))


def extracted() -> SynopticReport:
    """What the extractor reads from SOURCE, with the source text kept for quoting."""

    def at(words: str) -> tuple[int, int]:
        start = SOURCE.index(words)
        return start, start + len(words)

    elements = BreastInvasive(
        histologic_type=Reported(
            value="invasive ductal carcinoma", span=at("Invasive ductal carcinoma")
        ),
        grade=Reported(value="2", span=at("Nottingham grade 2")),
        tumor_size_mm=Reported(value=23, span=at("23 mm")),
        laterality=Reported(value="left", span=at("left breast")),
        margin_status=Reported(value="negative", span=at("Margins negative")),
        pT=Reported(value="pT2", span=at("pT2")),
        pN=Reported(value="pN1a", span=at("pN1a")),
        lymph_nodes_examined=Reported(value=14, span=at("2/14")),
        lymph_nodes_positive=Reported(value=2, span=at("2/14")),
        er_status=Reported(value="positive", span=at("ER positive")),
        er_percent=Reported(value=90, span=at("90%")),
    )
    return SynopticReport(
        id="TCGA-A1-0001",
        title="Report TCGA-A1-0001: extracted elements",
        elements=elements,
        source_text=SOURCE,
        notice="Extracted automatically; check against the source.",
    )


# -- drafting ---------------------------------------------------------------------------------
def test_offline_drafting_states_only_what_one_slide_supports() -> None:
    confident = measured_elements("colorectal adenocarcinoma epithelium", ["T2.02", "T1.04"])
    assert isinstance(confident, Colorectal)
    assert confident.histologic_type.value == "colorectal adenocarcinoma epithelium"
    assert confident.histologic_type.region_ids == ["T1.04", "T2.02"]
    stated = SynopticReport(id="r", title="t", elements=confident, notice="n").stated()
    assert list(stated) == ["histologic_type"]  # never TNM, margins or nodes from one slide
    # Indeterminate, not a neoplasm, or with no supporting region: the generic schema, empty.
    assert measured_elements(None, ["T1.01"]) == GenericSite()
    assert measured_elements("normal colon mucosa", ["T1.01"]) == GenericSite()
    assert measured_elements("cancer-associated stroma", ["T1.01"]) == GenericSite()
    assert measured_elements("colorectal adenocarcinoma epithelium", []) == Colorectal()


@pytest.mark.parametrize(
    ("diagnosis", "schema"),
    [
        ("invasive ductal carcinoma of the breast", "breast_invasive"),
        ("ductal carcinoma in situ", "breast_dcis"),
        ("prostatic acinar adenocarcinoma", "prostate_resection"),
        ("lung adenocarcinoma", "lung"),
        ("clear cell renal cell carcinoma", "kidney"),
        ("papillary thyroid carcinoma", "thyroid"),
        ("superficial spreading melanoma", "melanoma"),
        ("squamous cell carcinoma", "generic"),  # a neoplasm of no named site
        ("normal colon mucosa", "generic"),  # a site, but no neoplasm
    ],
)
def test_the_schema_follows_the_site_a_neoplastic_diagnosis_names(
    diagnosis: str, schema: str
) -> None:
    assert schema_for(diagnosis).model_fields["schema_name"].default == schema


def test_model_values_are_kept_only_when_every_region_they_cite_was_visited() -> None:
    written = Colorectal(
        histologic_type=Reported(value="adenocarcinoma", region_ids=["T1.02", "T1.01"]),
        pT=Reported(value="pT3", region_ids=["T1.01", "Z9.99"]),  # one region never visited
        grade=Reported(value="G2"),  # no region at all
        tumor_budding=Reported(value="low", region_ids=["T1.02"], span=(0, 4)),
    )
    kept, dropped = grounded_elements(written, {"T1.01", "T1.02"})
    assert dropped == ["grade", "pT"]
    assert kept.histologic_type.region_ids == ["T1.01", "T1.02"]
    assert not kept.pT.stated and not kept.grade.stated
    assert kept.tumor_budding.span is None  # drafted values rest on regions, not on text


def test_the_report_agent_drafts_a_grounded_synoptic_report_with_a_model(
    wsi_dir: Path, feature_cache: Path
) -> None:
    synoptic = {
        "histologic_type": {"value": "squamous cell carcinoma", "region_ids": ["T1.01"]},
        "pT": {"value": "pT2", "region_ids": ["Z9.99"]},
    }
    model = ScriptedChatModel(
        scripts={
            "navigate": {"choices": ["C1", "C2"], "reason": "densest"},
            "describe": {"description": "nests of atypical squamous cells", "suspicion": 0.8},
            "diagnose": {
                "hypotheses": [
                    {"name": "squamous cell carcinoma", "probability": 0.9, "support": ["T1.01"]}
                ],
                "stop": False,
            },
            "report": {"findings": [], "narrative": "Scripted narrative."},
            "synoptic": synoptic,
        }
    )
    context = make_context(feature_cache, model=model, trajectories=1, budget=2)
    run = analyse(wsi_dir / "CMU-1-Small-Region.svs", context, thread_id="case-7")
    report = run.state["report"].synoptic
    assert report.id == "case-7"
    assert report.elements.schema_name == "generic"
    assert report.stated() == {
        "histologic_type": Reported(value="squamous cell carcinoma", region_ids=["T1.01"])
    }
    assert [c.region_id for c in report.citations] == ["T1.01"]
    assert any("left pT not stated" in w for w in run.state["warnings"])
    assert "Synoptic elements" in report_markdown(run.state)


def test_a_reviewers_approval_reaches_the_synoptic_report(
    wsi_dir: Path, feature_cache: Path
) -> None:
    context = make_context(feature_cache, review=True, trajectories=1, budget=2)
    with open_checkpointer("memory", Path("unused")) as checkpointer:
        graph = compile_analysis(checkpointer)
        config = {"configurable": {"thread_id": "case-8"}, "recursion_limit": 100}
        graph.invoke(
            {"slide_path": str(wsi_dir / "CMU-1-Small-Region.svs")}, config, context=context
        )
        assert graph.get_state(config).values["report"].synoptic.status == "draft"
        final = graph.invoke(
            Command(resume={"approve": True, "note": "agree"}), config, context=context
        )
    synoptic = final["report"].synoptic
    assert (synoptic.status, synoptic.reviewer_note) == ("reviewed", "agree")
    assert "DRAFT" not in render(synoptic, "html")


# -- the document -------------------------------------------------------------------------------
@pytest.mark.parametrize("schema", list(SCHEMAS.values()), ids=list(SCHEMAS))
def test_a_report_round_trips_through_json_with_its_site_schema(
    schema: type[SynopticBase],
) -> None:
    report = drafted(elements=schema(procedure=Reported(value="resection", span=(0, 9))))
    again = SynopticReport.model_validate_json(report.model_dump_json())
    assert type(again.elements) is schema
    assert again == report


def test_a_checkpoint_rebuilds_the_synoptic_report() -> None:
    draft = ReportDraft(
        title="t",
        diagnosis="d",
        findings=[],
        differential=[],
        evidence=[],
        limitations=[],
        narrative="n",
        synoptic=drafted(),
    )
    restored = serializer().loads_typed(serializer().dumps_typed(draft))
    assert restored == draft
    assert isinstance(restored.synoptic.elements, Colorectal)


def test_every_shared_element_has_its_place_in_the_layout() -> None:
    placed = [name for _, names in GROUPS for name in names]
    assert sorted(placed) == sorted(set(SynopticBase.model_fields))


# -- rendering --------------------------------------------------------------------------------
def test_a_drafted_report_renders_as_markdown_html_json_and_fhir() -> None:
    report = drafted()
    markdown = render(report, "md")
    assert "> **DRAFT — requires pathologist review**" in markdown
    assert "| Histologic type | colorectal adenocarcinoma epithelium | regions T1.04, T2.02 |" in (
        markdown
    )
    assert "**Not stated:** Procedure, Tumor site," in markdown
    assert "pT," in markdown.split("**Not stated:**")[1]
    html = render(report, "html")
    assert html.startswith("<!DOCTYPE html>") and "<style>" in html
    assert not re.search(r"<script|<link|src=|href=", html)  # one self-contained file
    assert "Carcinoma of the colon and rectum (resection)" in html
    assert SynopticReport.model_validate_json(render(report, "json")) == report
    bundle = json.loads(render(report, "fhir"))
    assert bundle["resourceType"] == "Bundle"


def test_extracted_elements_quote_their_source_and_group_like_a_protocol() -> None:
    markdown = render(extracted(), "md")
    assert "| Tumor size (mm) | 23 mm | “23 mm” |" in markdown
    assert "| ER (%) | 90 % | “90%” |" in markdown
    order = [markdown.index(f"| **{group}** |") for group in ("Tumour", "Extent and staging")]
    order += [markdown.index(f"| **{group}** |") for group in ("Margins", "Lymph nodes")]
    assert order == sorted(order)
    assert markdown.index("| ER status |") > markdown.index("| **Site-specific")


def test_html_and_markdown_escape_hostile_values() -> None:
    hostile = "<script>alert('x')</script>"
    elements = Colorectal(
        histologic_type=Reported(value=hostile, region_ids=["T1.01"], basis='"><img src=x>')
    )
    report = drafted(
        title=f"Case {hostile}",
        elements=elements,
        narrative="</p><iframe src=//evil>",
        limitations=[hostile],
    )
    html = render(report, "html")
    assert "<script" not in html and "<img" not in html and "<iframe" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    markdown = render(report, "md")
    assert "<script" not in markdown and "<iframe" not in markdown
    linked = drafted(
        title="Case 7",
        elements=Colorectal(
            histologic_type=Reported(
                value="[click](javascript:alert(1)) ![x](http://evil/x.png) **bold** `code`",
                region_ids=["T1.01"],
            )
        ),
    )
    markdown = render(linked, "md")
    assert "](" not in markdown.replace("\\](", "")  # no live link or image
    assert r"\[click\]" in markdown and r"\*\*bold\*\*" in markdown and r"\`code\`" in markdown


def test_the_draft_banner_shows_only_while_the_report_is_a_draft() -> None:
    draft, reviewed = drafted(), drafted(status="reviewed", reviewer_note="agree; sign out")
    for fmt in ("md", "html"):
        assert "DRAFT — requires pathologist review" in render(draft, fmt)
        assert "DRAFT" not in render(reviewed, fmt)
    assert "Reviewed (agree; sign out)" in render(reviewed, "md")


# -- FHIR ---------------------------------------------------------------------------------------
def test_the_fhir_bundle_validates_and_has_one_observation_per_stated_element() -> None:
    report = extracted()
    bundle = to_fhir(report)
    Bundle.model_validate(bundle)  # valid FHIR R4 (R4B) as written out
    resources = [entry["resource"] for entry in bundle["entry"]]
    diagnostic, *observations = resources
    assert diagnostic["resourceType"] == "DiagnosticReport"
    assert diagnostic["status"] == "preliminary"
    assert diagnostic["code"]["coding"][0]["code"] == "60568-3"
    assert [o["resourceType"] for o in observations] == ["Observation"] * len(report.stated())
    assert len(diagnostic["result"]) == len(observations)
    assert {r["reference"] for r in diagnostic["result"]} == {
        e["fullUrl"] for e in bundle["entry"][1:]
    }
    by_field = {o["code"]["coding"][-1]["code"]: o for o in observations}
    loinc = {name: o["code"]["coding"][0]["code"] for name, o in by_field.items()}
    assert (loinc["pT"], loinc["pN"]) == ("21899-0", "21900-6")
    assert loinc["lymph_nodes_examined"] == "21894-1"
    assert by_field["pT"]["valueCodeableConcept"]["text"] == "pT2"
    assert by_field["tumor_size_mm"]["valueQuantity"] == {
        "value": 23.0,
        "unit": "mm",
        "system": "http://unitsofmeasure.org",
        "code": "mm",
    }
    assert by_field["lymph_nodes_positive"]["valueInteger"] == 2
    assert by_field["histologic_type"]["valueString"] == "invasive ductal carcinoma"
    assert by_field["pT"]["note"] == [{"text": "“pT2”"}]


def test_the_fhir_bundle_is_reproducible_and_final_once_reviewed() -> None:
    report = drafted()
    assert to_fhir(report) == to_fhir(report)
    entry = to_fhir(report)["entry"][1]
    assert entry["fullUrl"] == f"urn:uuid:{entry['resource']['id']}"
    evidence = entry["resource"]["extension"][0]["extension"]
    assert [e["valueString"] for e in evidence] == ["T1.04", "T2.02"]
    reviewed = to_fhir(drafted(status="reviewed"))
    assert {e["resource"]["status"] for e in reviewed["entry"]} == {"final"}
    specimen = reviewed["entry"][0]["resource"]["specimen"][0]
    assert specimen["identifier"]["value"] == "CRC-7"


def test_values_fhir_cannot_carry_are_explained(tmp_path: Path) -> None:
    record = {"id": "r1", "schema": "lung", "fields": {"procedure": {"value": "", "span": [0, 1]}}}
    path = tmp_path / "record.json"
    path.write_text(json.dumps(record))
    result = runner.invoke(app, ["report", "render", str(path), "--format", "fhir"])
    assert result.exit_code == 2, result.output
    assert "report r1 cannot be written as FHIR: valueString" in result.stderr


# -- the report commands ----------------------------------------------------------------------
@pytest.fixture
def analysis_json(wsi_dir: Path, feature_cache: Path, tmp_path: Path) -> Path:
    """The analysis.json `histopilot analyze` writes, from the offline graph on a small slide."""
    run = analyse(wsi_dir / "CMU-1-Small-Region.svs", make_context(feature_cache, budget=4))
    path = tmp_path / "analysis.json"
    path.write_text(json.dumps(analysis_record(run.state, run.thread_id)))
    return path


def test_render_an_offline_analysis_in_every_format(analysis_json: Path, tmp_path: Path) -> None:
    shown = runner.invoke(app, ["report", "render", str(analysis_json)])
    assert shown.exit_code == 0, shown.output
    assert "DRAFT — requires pathologist review" in shown.stdout
    assert "Schema `generic`" in shown.stdout  # a read of this slide names no neoplasm
    out = tmp_path / "out" / "report.html"
    written = runner.invoke(
        app, ["report", "render", str(analysis_json), "--format", "html", "--out", str(out)]
    )
    assert written.exit_code == 0, written.output
    assert out.read_text().startswith("<!DOCTYPE html>")
    fhir = runner.invoke(app, ["report", "render", str(analysis_json), "-f", "fhir"])
    assert fhir.exit_code == 0, fhir.output
    Bundle.model_validate_json(fhir.stdout)
    as_json = runner.invoke(app, ["report", "render", str(analysis_json), "-f", "json"])
    thread = json.loads(analysis_json.read_text())["thread_id"]
    assert SynopticReport.model_validate_json(as_json.stdout).id == thread


def test_render_an_extraction_record(tmp_path: Path) -> None:
    record = {
        "id": "TCGA-A1-0001",
        "schema": "breast",
        "fields": {
            "pT": {"value": "pT2", "span": [77, 80]},
            "tumor_size_mm": {"value": 23, "span": [53, 58], "basis": "greatest dimension"},
            "pM": {"value": None, "span": None},
        },
        "warnings": ["HER2 result pending"],
    }
    path = tmp_path / "record.json"
    path.write_text(json.dumps(record))
    result = runner.invoke(app, ["report", "render", str(path)])
    assert result.exit_code == 0, result.output
    assert "| pT | pT2 | characters 77–80 |" in result.stdout
    assert "| Tumor size (mm) | 23 mm | characters 53–58; greatest dimension |" in result.stdout
    assert "- HER2 result pending" in result.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no file at"),
        ("{not json", "is not valid JSON (line 1"),
        ('{"id": "a"}\n{"id": "b"}\n', "more than one JSON document"),
        ("[1, 2]", "neither an analysis.json"),
        ('{"report": {"title": "old"}}', "has no synoptic part"),
        ('{"id": "r", "schema": "spleen", "fields": {}}', "no report schema called 'spleen'"),
        ('{"id": "r", "schema": "lung", "fields": {"pT": {"value": "T9"}}}', "pT.value"),
        ('{"elements": {"schema_name": "colon"}}', "does not fit the report format"),
    ],
)
def test_unusable_report_files_are_explained(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "input.json"
    if content is not None:
        path.write_text(content)
    result = runner.invoke(app, ["report", "render", str(path)])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_report_schema_lists_the_elements_of_a_site() -> None:
    table = runner.invoke(app, ["report", "schema", "colon"])
    assert table.exit_code == 0, table.output
    assert "tumor_budding" in table.stdout and "intermediate" in table.stdout
    as_json = runner.invoke(app, ["report", "schema", "prostate_biopsy", "--json"])
    assert "gleason_primary" in json.loads(as_json.stdout)["properties"]
    unknown = runner.invoke(app, ["report", "schema", "spleen"])
    assert unknown.exit_code == 2 and "choose one of" in unknown.stderr


def test_the_docs_list_each_schemas_own_elements() -> None:
    docs = (REPO_ROOT / "docs" / "reports.md").read_text()
    shared = set(SynopticBase.model_fields)
    for name, schema in SCHEMAS.items():
        row = next(line for line in docs.splitlines() if line.startswith(f"| `{name}` |"))
        listed = set(re.findall(r"`(\w+)`", row.split("|")[3]))
        assert listed == set(schema.model_fields) - shared - {"schema_name"}, name
