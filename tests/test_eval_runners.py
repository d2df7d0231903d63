"""`histopilot eval …`: every runner on a real slice of the shared data, offline, with its
folder of scores, tables, plots and run card."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from histopilot.cli import app
from histopilot.evals.metrics import java_available, leave_one_out_knn
from histopilot.retrieval.encoders import load_encoder
from histopilot.retrieval.patch_index import PatchIndex
from histopilot.retrieval.reference import read_labels
from histopilot.retrieval.search import load_query_image
from tests.agent_helpers import analyse, make_context
from tests.crc_patches import crc_rows, split_by_patch, vqa_questions
from tests.openai_stub import OpenAIStub, Reply, chunk, completion

PNG = b"\x89PNG\r\n\x1a\n"


def run(*args: str) -> dict:
    """Run ``histopilot eval …`` with ``--json`` and return what it printed."""
    result = CliRunner().invoke(app, ["eval", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def refused(*args: str) -> str:
    result = CliRunner().invoke(app, ["eval", *args])
    assert result.exit_code == 2, result.output
    return " ".join(result.output.split())


def assert_written(out: Path, task: str, figure: str) -> dict:
    """The evaluation folder: its files, the plot a real PNG, a complete run card."""
    for name in ("scores.json", "report.md", "items.jsonl", "run.json"):
        assert (out / name).is_file(), name
    assert (out / f"{figure}.png").read_bytes().startswith(PNG)
    card = json.loads((out / "run.json").read_text())
    assert card["task"] == task and len(card["data_sha256"]) == 64 and card["data_files"] >= 1
    assert card["versions"]["histopilot"] and card["models"] and card["seconds"] >= 0
    assert json.loads((out / "scores.json").read_text())["task"] == task
    return card


def test_eval_lists_every_runner():
    result = CliRunner().invoke(app, ["eval", "--help"])
    for runner in ("extraction", "vqa", "report-generation", "retrieval", "generation", "agent"):
        assert runner in result.output


def test_retrieval_reproduces_the_offline_encoders_knn_figures(test_data: Path, tmp_path: Path):
    patches = test_data / "patches" / "crc_val_he_7k"
    result = run("retrieval", "--images", str(patches), "--out", str(tmp_path / "eval"))
    encoder = load_encoder("offline")
    images = read_labels(patches, None)
    vectors = encoder.encode_images([load_query_image(image.path) for image in images])
    labels = [image.label for image in images]
    scores = result["scores"]
    # the figures docs/retrieval.md quotes (1-NN 78.1 %, 3-NN 65.6 %), through the index
    assert scores["majority_vote_at_k"]["1"] == leave_one_out_knn(vectors, labels, k=1) == 25 / 32
    assert scores["majority_vote_at_k"]["3"] == leave_one_out_knn(vectors, labels, k=3) == 21 / 32
    assert scores["accuracy_at_k"]["5"] >= scores["accuracy_at_k"]["1"]
    card = assert_written(tmp_path / "eval", "retrieval", "retrieval")
    assert card["data_files"] == 33 and card["models"][0]["model"] == "offline"
    items = [json.loads(line) for line in (tmp_path / "eval" / "items.jsonl").open()]
    assert len(items) == 32 and all(len(item["ranked"]) == 5 for item in items)


def test_slide_retrieval_leaves_the_query_slide_out(
    wsi_dir: Path, feature_cache: Path, tmp_path: Path
):
    from histopilot.retrieval.features import embed_slide
    from histopilot.slide import open_slide

    encoder = load_encoder("offline")
    index = PatchIndex.create(tmp_path / "slides", encoder=encoder.name, dim=encoder.dim)
    # two slides under two labels: a query that could find itself would score 1, not 0
    for name, mpp in (
        ("CMU-1-Small-Region.svs", None),
        ("dicom-wsi-TCGA-XK-AAJU-01A-01-TS1-level.dcm", 0.5),
    ):
        with open_slide(wsi_dir / name, mpp=mpp) as slide:
            features = embed_slide(slide, encoder, cache_dir=feature_cache)
            index.add_slide(features, label=name.split("-")[0])
    slides = run("retrieval", "--index", str(tmp_path / "slides"), "--level", "slide", "--k", "1")
    assert slides["scores"]["count"] == 2 and slides["scores"]["accuracy_at_k"]["1"] == 0.0
    patches = run("retrieval", "--index", str(tmp_path / "slides"), "--k", "1,5")
    assert patches["scores"]["count"] == len(index) and patches["scores"]["accuracy_at_k"]["5"] == 0
    assert patches["card"]["models"][0]["model"] == "offline"


def _vqa_table(path: Path, rows: list[dict], names: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in vqa_questions(rows, names)))
    return path


def test_vqa_offline_baseline_answers_held_out_patches(test_data: Path, tmp_path: Path):
    from scripts.crc_vqa import build

    questions, bank = build(test_data / "patches" / "crc_val_he_7k", tmp_path / "vqa")
    shutil.copy(test_data / "wsi" / "CMU-1-Small-Region.svs", questions.parent)
    first = json.loads(questions.read_text().splitlines()[0])
    extra = [  # hostile and broken rows are skipped, not fatal
        {"id": "x1", "image": "../../etc/passwd", "question": "q?", "answer": "yes"},
        {"id": "x2", "image": "missing.png", "question": "q?", "answer": "no"},
        {"id": "x3", "image": first["image"], "question": "", "answer": "no"},
        {
            "id": "x4",
            "image": first["image"],
            "question": "q?",
            "choices": ["IHC", "PAS"],
            "answer": "Z",
        },
        {"id": "x5", "image": first["image"], "question": "q?", "answer": 7},
        # needs the chat agent's model, so offline it is recorded unanswered
        {"id": "s", "image": "CMU-1-Small-Region.svs", "question": "Is this H&E?", "answer": "yes"},
    ]
    with questions.open("a") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in extra) + "{broken json\n")
    out = tmp_path / "eval"
    result = run(
        "vqa", "--data", str(questions), "--reference", str(bank), "--out", str(out), "--no-meteor"
    )
    scores = result["scores"]
    assert scores["questions"] == 4 * 16 + 2  # the numeric answer is read as text
    assert {kind: v["count"] for kind, v in scores["by_kind"].items()} == {
        "multiple choice": 16,
        "open": 17,
        "yes/no": 33,
    }
    items = {item["id"]: item for item in map(json.loads, (out / "items.jsonl").open())}
    mc = [item for item in items.values() if item["kind"] == "multiple choice"]
    assert scores["by_kind"]["multiple choice"]["accuracy"] == sum(i["correct"] for i in mc) / 16
    assert scores["by_kind"]["multiple choice"]["accuracy"] > 0.5  # chance is 0.25
    # the baseline's answer to "is this X?" follows its class: yes for one name, no for another
    assert scores["by_kind"]["yes/no"]["accuracy"] > 0.5
    # an unanswered question is never right, whatever its answer
    assert all(not item["correct"] for item in items.values() if not item["given"])
    assert "needs the chat agent" in items["s"]["error"]
    notes = " ".join(result["notes"])
    assert "image outside the image folder" in notes and "empty question" in notes
    assert "answer not among the choices" in notes and "missing" in notes
    assert_written(out, "vqa", "accuracy")


def test_vqa_reads_the_option_a_reply_names():
    from histopilot.evals.vqa import Question, interpret

    question = Question(
        id="q",
        image=Path("x.png"),
        question="Which?",
        kind="multiple choice",
        choices=["adipose", "lymphoma", "mucus", "debris"],
        answer="debris",
    )
    replies = {
        "D": "debris",
        "(d)": "debris",
        "**D**": "debris",
        "Answer: C": "mucus",
        "The answer is (B).": "lymphoma",
        "Option A": "adipose",
        "B. lymphoma": "lymphoma",
        "adipose tissue": "adipose",
        "lymphoma or mucus": "",
        "I cannot tell": "",
        "": "",
    }
    assert {reply: interpret(reply, question) for reply in replies} == replies


def test_vqa_through_a_served_describer_and_the_chat_agent(
    test_data: Path, wsi_dir: Path, tmp_path: Path, isolated_config
):
    folder, rows = crc_rows(test_data)
    names = {row["label"]: row["label_name"] for row in rows}
    images = tmp_path / "patches"
    shutil.copytree(folder, images)
    shutil.copy(wsi_dir / "CMU-1-Small-Region.svs", images)
    table = _vqa_table(images / "questions.jsonl", rows[:1], names)  # one ADI patch
    with table.open("a") as handle:  # a SlideBench-style question about the whole slide
        slide_question = {
            "id": "slide",
            "image": "CMU-1-Small-Region.svs",
            "question": "Which stain is this?",
            "choices": ["IHC", "H&E"],
            "answer": "B",
        }
        handle.write(json.dumps(slide_question) + "\n")
    with OpenAIStub() as stub:
        role = f'backend = "openai"\nmodel = "pathvlm"\nbase_url = "{stub.base_url}"\n'
        (tmp_path / "histopilot.toml").write_text(
            f"[roles.describer]\n{role}max_retries = 0\n[roles.orchestrator]\n{role}"
        )
        replies = ("Yes, it is.", "Yes.", "A. adipose", "Fat, adipose tissue")
        stub.reply(*(Reply(body=completion(text)) for text in replies))
        stub.reply(Reply(events=[chunk({"role": "assistant", "content": "B"}, "stop")]))
        result = run("vqa", "--data", str(table), "--backend", "openai")
    parts = stub.requests[2].body["messages"][-1]["content"]
    assert parts[0]["type"] == "text" and "A. adipose" in parts[0]["text"]
    assert parts[1]["type"] == "image_url" and parts[1]["image_url"]["url"].startswith("data:")
    asked = json.dumps(stub.requests[4].body["messages"])
    assert (
        "Which stain is this?" in asked and "B. H&E" in asked and "tools" in stub.requests[4].body
    )
    by_kind = result["scores"]["by_kind"]
    # the yes/no pair: right, then wrong ("yes" to the other class); "A. adipose" is option A;
    # the slide question's "B" is H&E
    assert by_kind["yes/no"]["accuracy"] == 0.5 and by_kind["multiple choice"]["accuracy"] == 1.0
    assert by_kind["multiple choice"]["count"] == 2
    assert by_kind["open"]["accuracy"] == 0.0 and 0 < by_kind["open"]["token_f1"] < 1
    describer = result["card"]["models"][0]
    assert describer | {"role": "describer", "backend": "openai", "model": "pathvlm"} == describer


def test_vqa_reads_slidebench_style_option_columns(wsi_dir: Path, tmp_path: Path):
    from histopilot.evals.vqa import read_questions

    shutil.copy(wsi_dir / "CMU-1-Small-Region.svs", tmp_path)
    table = tmp_path / "slidebench.csv"
    table.write_text(
        "Slide,Task,Question,A,B,C,D,Answer\n"
        "CMU-1-Small-Region.svs,stain,Which stain is this?,IHC,H&E,PAS,Trichrome,B\n"
        "../outside.svs,stain,Which stain?,IHC,H&E,,,A\n"
    )
    columns = {"image": "Slide", "question": "Question", "choices": "A,B,C,D", "answer": "Answer"}
    questions, report = read_questions(table, tmp_path / "images", columns)
    [question] = questions
    assert question.slide and question.kind == "multiple choice"
    assert question.choices == ["IHC", "H&E", "PAS", "Trichrome"] and question.answer == "H&E"
    assert report.by_reason == {"image outside the image folder": 1}


def _with_t(text: str) -> str | None:
    """The report with its first pT digit moved one category on, or None without one."""
    found = re.search(r"pT([1-3])", text)
    if found is None:
        return None
    return text[: found.start(1)] + str(int(found.group(1)) + 1) + text[found.end(1) :]


def test_report_generation_tells_a_fluent_wrong_report_from_a_right_one(
    test_data: Path, tmp_path: Path
):
    references = [
        json.loads(line)["text"]
        for line in (test_data / "reports" / "tcga_reports_gold_dev.jsonl").open()
    ][:60]
    pairs = [(text, _with_t(text)) for text in references if _with_t(text)][:12]
    right, wrong = tmp_path / "right.jsonl", tmp_path / "wrong.csv"
    right.write_text("".join(json.dumps({"reference": r, "generated": r}) + "\n" for r, _ in pairs))
    with wrong.open("w", newline="") as handle:  # a renamed column, read through --column
        writer = csv.writer(handle)
        writer.writerow(["reference", "draft"])
        writer.writerows(pairs)
    meteor = [] if java_available() else ["--no-meteor"]  # METEOR's Java start: ~10 s
    exact = run("report-generation", "--data", str(right), *meteor)["scores"]
    swapped = run(
        "report-generation",
        "--data",
        str(wrong),
        "--column",
        "generated=draft",
        "--out",
        str(tmp_path / "eval"),
        "--no-meteor",
    )["scores"]
    assert exact["text"]["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    t_exact = next(f for f in exact["fields"] if f["field"] == "T category")
    t_swapped = next(f for f in swapped["fields"] if f["field"] == "T category")
    assert t_exact["agreement"] == 1.0 and t_exact["in_reference"] == len(pairs)
    # one character changed: BLEU barely moves, the synoptic T agreement collapses
    assert swapped["text"]["bleu_4"] > 0.97
    assert t_swapped["agreement"] <= 0.2
    assert swapped["field_agreement"] < exact["field_agreement"] == 1.0
    if java_available():
        assert exact["text"]["meteor"] > 0.95
    items = [json.loads(line) for line in (tmp_path / "eval" / "items.jsonl").open()]
    assert sum("T category" in (item["disagreeing_fields"] or {}) for item in items) >= 10
    assert_written(tmp_path / "eval", "report-generation", "field-agreement")


def test_generation_scores_a_stain_normalization_run(test_data: Path, tmp_path: Path):
    folder, rows = crc_rows(test_data)
    sources, held = split_by_patch(rows)  # the reader's examples are never sources
    tiles, reference = tmp_path / "tiles", tmp_path / "reference"
    for target, chosen in ((tiles, sources), (reference, held)):
        target.mkdir()
        for row in chosen:
            shutil.copy(folder / row["file"], target)
    runner = CliRunner()
    fit = [
        "stain",
        "fit",
        str(folder / "TUM-TCGA-DRHQMTQA.png"),
        "--out",
        str(tmp_path / "target.json"),
    ]
    assert runner.invoke(app, fit).exit_code == 0
    normalize = [
        "stain",
        "normalize",
        str(tiles),
        "--target",
        str(tmp_path / "target.json"),
        "--out",
        str(tmp_path / "norm"),
    ]
    assert runner.invoke(app, normalize).exit_code == 0
    result = run(
        "generation",
        str(tmp_path / "norm" / "stain.csv"),
        "--reference",
        str(reference),
        "--out",
        str(tmp_path / "eval"),
    )
    scores = result["scores"]
    with (tmp_path / "norm" / "stain.csv").open() as handle:  # glass or one-stain tiles
        flagged = sum(row["flag"] != "normalized" for row in csv.DictReader(handle))
    assert scores["pairs"] == 16 - flagged and 0.5 < scores["ssim"] < 1.0 and scores["psnr"] > 20
    assert scores["features"] == "offline" and scores["lpips"] is None
    assert any("LPIPS skipped" in note for note in result["notes"])
    assert scores["generated"]["fid"] > 0 and 0 <= scores["class_kept"] <= 1
    items = [json.loads(line) for line in (tmp_path / "eval" / "items.jsonl").open()]
    kept = sum(item["source_class"] == item["output_class"] for item in items) / len(items)
    assert scores["class_kept"] == kept
    assert_written(tmp_path / "eval", "generation", "closeness")
    # the tiles as their own outputs: perfect closeness, realism equal to the sources', no flips
    same = tmp_path / "same.csv"
    same.write_text("source,output\n" + "".join(f"{p},{p}\n" for p in sorted(tiles.iterdir())))
    scores = run("generation", str(same), "--reference", str(reference), "--target", "TUM")[
        "scores"
    ]
    assert scores["ssim"] == pytest.approx(1.0, abs=1e-4) and scores["mae"] == scores["nrmse"] == 0
    assert scores["generated"]["fid"] == pytest.approx(scores["source"]["fid"])
    assert scores["flip_rate"] == 0.0 and scores["class_kept"] == 1.0
    # a source among the reference is left out of it, so it cannot find itself
    leaky = run("generation", str(same), "--reference", str(folder))
    assert any("also sources" in note for note in leaky["notes"])


def test_agent_runner_sweeps_budgets_and_reproduces_analyze(
    wsi_dir: Path, feature_cache: Path, tmp_path: Path, isolated_config
):
    dicom = wsi_dir / "dicom-wsi-TCGA-XK-AAJU-01A-01-TS1-level.dcm"
    (tmp_path / "broken.svs").write_bytes(b"not a slide at all" * 100)
    slides = tmp_path / "slides.csv"
    # TCGA sample type 01 is a primary tumour; the file declares no µm/px, 0.5 is assumed.
    # A broken slide fails on its own, and a missing one is skipped before any work.
    slides.write_text(
        f"slide,label,mpp\n{dicom},tumour,0.5\nbroken.svs,tumour,0.5\nnowhere.svs,tumour,\n"
    )
    (tmp_path / "histopilot.toml").write_text(
        f'[agents]\nfeature_cache = "{feature_cache}"\ntrajectories = 2\nmin_regions = 2\n'
    )
    out = tmp_path / "eval"
    result = run(
        "agent",
        "--slides",
        str(slides),
        "--budgets",
        "2,6",
        "--map",
        "sparse=not tumour",
        "--out",
        str(out),
    )
    items = [json.loads(line) for line in (out / "items.jsonl").open()]
    analysed = [item for item in items if item["slide"] == dicom.name]
    for budget, item in zip((2, 6), analysed, strict=True):
        direct = analyse(
            dicom,
            make_context(
                feature_cache, slide_mpp=0.5, budget=budget, trajectories=2, min_regions=2
            ),
        )
        diagnosis = direct.state["diagnosis"]
        assert (item["diagnosis"], item["regions"]) == (
            diagnosis.label,
            len(direct.state["regions"]),
        )
        mapped = {"sparse": "not tumour"}.get(diagnosis.label, diagnosis.label)
        assert item["predicted"] == ("indeterminate" if diagnosis.indeterminate else mapped)
    failed = [item for item in items if item["slide"] == "broken.svs"]
    assert [item["predicted"] for item in failed] == ["failed", "failed"]
    assert failed[0]["regions"] is None and failed[0]["error"]
    for budget in result["scores"]["budgets"]:
        mine = [item for item in items if item["budget"] == budget["budget"]]
        assert (
            budget["slides"] == 2
            and budget["regions"] == analysed[0 if budget["budget"] == 2 else 1]["regions"]
        )
        assert budget["accuracy"] == sum(i["predicted"] == "tumour" for i in mine) / 2
        assert budget["top_3"] == sum("tumour" in i["differential"][:3] for i in mine) / 2
    assert analysed[0]["regions"] <= 2 * 2 < analysed[1]["regions"] <= 6 * 2
    assert any("nowhere.svs" in note for note in result["notes"])
    card = assert_written(out, "agent", "accuracy-vs-regions")
    assert card["seed"] is not None and card["options"]["budgets"] == [2, 6]


def test_runners_refuse_bad_input_with_one_line(test_data: Path, tmp_path: Path):
    patches = test_data / "patches" / "crc_val_he_7k"
    questions = tmp_path / "questions.csv"
    shutil.copy(patches / "ADI-TCGA-EENSRDNW.png", tmp_path / "patches.png")
    questions.write_text("image,question,answer\npatches.png,Fat?,yes\n")
    assert "--reference INDEX" in refused("vqa", "--data", str(questions))
    assert "one of --index" in refused("retrieval")
    assert "positive integers" in refused("retrieval", "--images", str(patches), "--k", "0")
    assert "NAME=COLUMN" in refused(
        "report-generation", "--data", str(patches / "labels.csv"), "--column", "nonsense"
    )
    assert "no column(s) reference, generated" in refused(
        "report-generation", "--data", str(patches / "labels.csv")
    )
    assert "not a label" in refused(
        "generation", str(patches / "labels.csv"), "--reference", str(patches), "--target", "XYZ"
    )
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert "not empty" in refused("retrieval", "--images", str(patches), "--out", str(occupied))
    assert (occupied / "notes.txt").read_text() == "mine"
    missing = tmp_path / "slides.csv"
    missing.write_text("slide,label\nnowhere.svs,tumour\n")
    assert "no slide at" in refused("agent", "--slides", str(missing))
