"""The agent graph's routing and state, with scripted models on a real slide.

Models are scripted (tests/fake_models.py): these tests check who runs when, what reaches
whom, when a trajectory stops, and what persists; not the prose.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from langgraph.runtime import Runtime
from langgraph.types import Command

from histopilot.agents.checkpoints import open_checkpointer
from histopilot.agents.diagnose import vote
from histopilot.agents.graph import build_analysis_graph, build_trajectory_graph, compile_analysis
from histopilot.agents.run import run_analysis
from histopilot.agents.state import Differential, Hypothesis, TrajectoryResult
from histopilot.errors import HistopilotError
from tests.agent_helpers import analyse, make_context
from tests.fake_models import ScriptedChatModel

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def slide(wsi_dir: Path) -> Path:
    return wsi_dir / "CMU-1-Small-Region.svs"


def differential(name: str, probability: float, *, stop: bool, directive=None) -> dict:
    return {
        "hypotheses": [
            {"name": name, "probability": probability, "support": ["T1.01"]},
            {"name": "benign skin", "probability": round(1 - probability, 2), "support": []},
        ],
        "stop": stop,
        "directive": directive,
        "rationale": "scripted",
    }


def scripted(**overrides) -> ScriptedChatModel:
    scripts = {
        "navigate": {"choices": ["C1", "C2"], "reason": "the densest fields"},
        "describe": {"description": "nests of atypical squamous cells", "suspicion": 0.8},
        "diagnose": differential("squamous cell carcinoma", 0.7, stop=False),
        "report": {
            "findings": [
                {"text": "Atypical squamous nests.", "region_ids": ["T1.01", "T1.02"]},
                {"text": "An invented claim about a field never seen.", "region_ids": ["Z9.99"]},
            ],
            "narrative": "Scripted narrative.",
        },
    }
    return ScriptedChatModel(scripts=scripts | overrides)


def test_triage_then_navigate_describe_diagnose_loop_then_vote_and_report(
    slide: Path, feature_cache: Path
) -> None:
    context = make_context(feature_cache, model=scripted(), trajectories=1, budget=4)
    with open_checkpointer("memory", Path("unused")) as checkpointer:
        graph = compile_analysis(checkpointer)
        config = {"configurable": {"thread_id": "order"}, "recursion_limit": 100}
        nodes = [
            node
            for _, update in graph.stream(
                {"slide_path": str(slide)},
                config,
                context=context,
                stream_mode="updates",
                subgraphs=True,
            )
            for node in update
        ]
    assert nodes[0] == "triage"
    assert nodes[-3:] == ["trajectory", "vote", "report"]
    state = graph.get_state(config).values
    budget = state["triage"].budget  # triage scales the budget by the slide's risk
    assert 2 <= budget <= 4
    # Each step: navigate picks up to two fields, one describe branch each, then diagnose.
    steps = " ".join(nodes[1:-3]).split("navigate")[1:]
    assert [step.split() for step in steps] == [
        ["describe"] * min(2, budget - 2 * i) + ["diagnose"] for i in range(len(steps))
    ]
    assert len(state["regions"]) == budget
    assert state["trajectories"][0].stop_reason == "budget spent"


def test_report_keeps_only_statements_citing_visited_regions(
    slide: Path, feature_cache: Path
) -> None:
    run = analyse(slide, make_context(feature_cache, model=scripted(), trajectories=1, budget=2))
    report = run.state["report"]
    assert [s.text for s in report.findings] == ["Atypical squamous nests."]
    cited = {c.region_id for s in report.findings for c in s.citations}
    assert cited <= set(run.state["regions"])
    assert any("dropped 1 statement" in w for w in run.state["warnings"])
    assert "not a diagnosis" in report.notice


def test_a_trajectory_stops_when_the_diagnoser_is_sure_or_the_budget_is_spent(
    slide: Path, feature_cache: Path
) -> None:
    sure = scripted(diagnose=differential("squamous cell carcinoma", 0.95, stop=True))
    run = analyse(slide, make_context(feature_cache, model=sure, trajectories=1, budget=8))
    (trajectory,) = run.state["trajectories"]
    assert len(trajectory.regions) == 2  # min_regions reached after the first step
    assert trajectory.stop_reason == "the diagnoser judged the evidence sufficient"

    unsure = scripted(diagnose=differential("squamous cell carcinoma", 0.55, stop=False))
    run = analyse(slide, make_context(feature_cache, model=unsure, trajectories=1, budget=6))
    (trajectory,) = run.state["trajectories"]
    assert trajectory.stop_reason == "budget spent"
    assert len(trajectory.regions) == run.state["triage"].budget


def test_a_directive_from_diagnose_reaches_navigate(slide: Path, feature_cache: Path) -> None:
    directive = {"target": "mitoses in the tumour", "magnification": "high", "reason": "grade"}
    model = scripted(
        diagnose=differential("squamous cell carcinoma", 0.6, stop=False, directive=directive)
    )
    run = analyse(slide, make_context(feature_cache, model=model, trajectories=1, budget=4))
    second_request = model.asked("navigate")[1][-1].text
    assert "Looking for: mitoses in the tumour" in second_request
    assert "high power at" in second_request
    second_step = [r for r in run.state["regions"].values() if r.step == 2]
    assert {r.magnification for r in second_step} == {"high"}


def test_unusable_model_answers_fall_back_to_measurements_and_say_so(
    slide: Path, feature_cache: Path
) -> None:
    model = scripted(describe="I would rather not answer in JSON.")
    run = analyse(slide, make_context(feature_cache, model=model, trajectories=1, budget=2))
    findings = run.state["findings"].values()
    assert {f.source for f in findings} == {"measured"}
    assert all("nuclei" in f.text or "power" in f.text for f in findings)
    assert any(w.startswith("describe T1.0") for w in run.state["warnings"])


def test_trajectories_vote_and_disagreement_lowers_confidence(feature_cache: Path) -> None:
    def result(trajectory: int, label: str, confidence: float) -> TrajectoryResult:
        other = "benign" if label == "carcinoma" else "carcinoma"
        return TrajectoryResult(
            trajectory=trajectory,
            seed=0,
            regions=[f"T{trajectory}.01"],
            stop_reason="done",
            differential=Differential(
                hypotheses=[
                    Hypothesis(
                        label=label, name=label, probability=0.8, support=[f"T{trajectory}.01"]
                    ),
                    Hypothesis(label=other, name=other, probability=0.2),
                ],
                confidence=confidence,
                method="scripted",
            ),
        )

    runtime = Runtime(context=make_context(feature_cache, indeterminate_below=0.7))
    agreeing = vote({"trajectories": [result(k, "carcinoma", 0.9) for k in (1, 2, 3)]}, runtime)
    split = vote(
        {
            "trajectories": [
                result(1, "carcinoma", 0.9),
                result(2, "carcinoma", 0.9),
                result(3, "benign", 0.9),
            ]
        },
        runtime,
    )
    assert agreeing["diagnosis"].agreement == 1.0
    assert agreeing["diagnosis"].confidence == pytest.approx(0.9)
    assert not agreeing["diagnosis"].indeterminate
    assert split["diagnosis"].label == "carcinoma"
    assert split["diagnosis"].votes == {"carcinoma": 2, "benign": 1}
    assert split["diagnosis"].confidence == pytest.approx(0.6)
    assert split["diagnosis"].indeterminate
    assert split["diagnosis"].statement.startswith("Indeterminate — review")
    # A sure dissenter lowers the confidence of a hesitant majority; it never raises it.
    hesitant = vote({"trajectories": [result(k, "carcinoma", 0.3) for k in (1, 2, 3)]}, runtime)
    dissent = vote(
        {
            "trajectories": [
                result(1, "carcinoma", 0.3),
                result(2, "carcinoma", 0.3),
                result(3, "benign", 1.0),
            ]
        },
        runtime,
    )
    assert dissent["diagnosis"].confidence < hesitant["diagnosis"].confidence


def test_the_same_seed_visits_the_same_regions(slide: Path, feature_cache: Path) -> None:
    def regions(seed: int) -> list[tuple]:
        run = analyse(slide, make_context(feature_cache, seed=seed, budget=6))
        return sorted((r.id, r.box, r.magnification) for r in run.state["regions"].values())

    assert regions(3) == regions(3)
    assert regions(3) != regions(4)


def test_review_interrupts_before_the_report_and_resumes(slide: Path, feature_cache: Path) -> None:
    model = scripted()
    context = make_context(feature_cache, model=model, review=True, trajectories=1, budget=2)
    with open_checkpointer("memory", Path("unused")) as checkpointer:
        graph = compile_analysis(checkpointer)
        config = {"configurable": {"thread_id": "review"}, "recursion_limit": 100}
        graph.invoke({"slide_path": str(slide)}, config, context=context)
        paused = graph.get_state(config)
        assert paused.next == ("review",)
        payload = paused.interrupts[0].value
        assert payload["action"] == "review_report"
        assert payload["report"]["status"] == "draft"
        final = graph.invoke(
            Command(resume={"approve": True, "note": "agree"}), config, context=context
        )
    assert final["report"].status == "reviewed"
    assert final["report"].reviewer_note == "agree"
    # What was approved is exactly what was shown: resuming does not write the report again.
    assert final["report"].narrative == payload["report"]["narrative"]
    assert len(model.asked("report")) == 1


def test_a_thread_resumes_and_is_never_restarted(
    slide: Path, wsi_dir: Path, feature_cache: Path
) -> None:
    context = make_context(feature_cache, review=True, trajectories=1, budget=2)
    with open_checkpointer("memory", Path("unused")) as checkpointer:
        paused = run_analysis(slide, context, checkpointer, thread_id="case")
        assert paused.state["report"].status == "draft"  # waiting for review
        resumed = run_analysis(
            slide,
            context,
            checkpointer,
            thread_id="case",
            on_review=lambda payload: {"approve": True, "note": "seen"},
        )
        assert resumed.state["report"].status == "reviewed"
        assert len(resumed.state["trajectories"]) == 1  # continued, not analysed again
        with pytest.raises(HistopilotError, match="has finished"):
            run_analysis(slide, context, checkpointer, thread_id="case")
        other = wsi_dir / "tcga-cr-7395-01a-01-ts1.svs"
        with pytest.raises(HistopilotError, match="is the analysis of"):
            run_analysis(other, context, checkpointer, thread_id="case")


RESTART_SCRIPT = """
import sys
from pathlib import Path
from histopilot.agents.checkpoints import open_checkpointer
from histopilot.agents.run import run_analysis
from tests.agent_helpers import make_context

slide, cache, database = sys.argv[1:4]
context = make_context(Path(cache), review=True, trajectories=1, budget=2)
with open_checkpointer(database, Path(database)) as checkpointer:
    run = run_analysis(slide, context, checkpointer, thread_id="restart")
print(sorted(run.state["regions"]), run.state["report"].status)
"""


def test_a_thread_survives_a_process_restart_with_sqlite(
    slide: Path, feature_cache: Path, tmp_path: Path
) -> None:
    database = tmp_path / "threads.sqlite"
    first = subprocess.run(
        [sys.executable, "-c", RESTART_SCRIPT, str(slide), str(feature_cache), str(database)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=True,
        timeout=300,
    )
    assert first.stdout.strip() == "['T1.01', 'T1.02'] draft"  # paused for review

    context = make_context(feature_cache, review=True, trajectories=1, budget=2)
    with open_checkpointer(str(database), database) as checkpointer:
        graph = compile_analysis(checkpointer)
        config = {"configurable": {"thread_id": "restart"}}
        final = graph.invoke(
            Command(resume={"approve": False, "note": "recut"}), config, context=context
        )
    assert sorted(final["regions"]) == ["T1.01", "T1.02"]
    assert final["report"].status == "draft"
    assert final["report"].reviewer_note == "recut"


def test_the_topology_and_the_studio_entry() -> None:
    outer = build_analysis_graph().compile().get_graph().draw_mermaid()
    inner = build_trajectory_graph().compile().get_graph().draw_mermaid()
    for node in ("triage", "trajectory", "vote", "report"):
        assert node in outer
    for node in ("navigate", "describe", "diagnose"):
        assert node in inner
    studio = json.loads((REPO_ROOT / "langgraph.json").read_text())
    module, _, name = studio["graphs"]["analysis"].partition(":")
    assert (REPO_ROOT / module).is_file()
    from histopilot.agents import studio as entry

    assert getattr(entry, name).checkpointer is None  # LangGraph's server brings its own
