"""Chat with a slide through a tool-calling model (scripted) and the in-process backend."""

from __future__ import annotations

from pathlib import Path

from langchain_core.messages import AIMessage, ToolMessage

from histopilot.agents.chat import ChatSession
from histopilot.agents.checkpoints import open_checkpointer
from histopilot.config import RoleConfig
from histopilot.serve.transformers_backend import TransformersChatModel
from tests.agent_helpers import analyse, make_context
from tests.fake_models import ScriptedChatModel


def test_the_chat_agent_calls_a_tool_and_the_thread_remembers(
    wsi_dir: Path, feature_cache: Path, tmp_path: Path
) -> None:
    go_to = AIMessage(
        "",
        tool_calls=[
            {
                "name": "describe_slide_region",
                "id": "call-1",
                "args": {"x": 448, "y": 896, "width": 448, "height": 448},
            }
        ],
    )
    model = ScriptedChatModel(scripts={"chat": [go_to, "C1 is a cellular field."]})
    context = make_context(feature_cache, model=model)
    slide = wsi_dir / "CMU-1-Small-Region.svs"
    database = tmp_path / "threads.sqlite"
    with open_checkpointer(str(database), database) as checkpointer:
        session = ChatSession(context, slide, checkpointer, thread_id="t")
        assert session.ask("What is at 448, 896?") == "C1 is a cellular field."
    with open_checkpointer(str(database), database) as checkpointer:
        state = ChatSession(context, slide, checkpointer, thread_id="t").state
    assert state["regions"]["C1"].box == (448, 896, 448, 448)
    assert "high-power field" in state["findings"]["C1"].text
    tool_answer = next(m for m in state["messages"] if isinstance(m, ToolMessage))
    assert tool_answer.text.startswith("C1: high-power field")
    # The model saw the slide's context and the tool result on its second turn.
    second_turn = model.asked("chat")[1]
    assert any(isinstance(m, ToolMessage) for m in second_turn)


def test_a_tool_error_goes_back_to_the_model_as_text(wsi_dir: Path, feature_cache: Path) -> None:
    unknown = AIMessage(
        "",
        tool_calls=[{"name": "describe_slide_region", "id": "c", "args": {"region_id": "T9.99"}}],
    )
    model = ScriptedChatModel(scripts={"chat": [unknown, "That region does not exist."]})
    context = make_context(feature_cache, model=model)
    with open_checkpointer("memory", Path("unused")) as checkpointer:
        session = ChatSession(context, wsi_dir / "CMU-1-Small-Region.svs", checkpointer)
        assert session.ask("Describe T9.99") == "That region does not exist."
        tool_answer = next(m for m in session.state["messages"] if isinstance(m, ToolMessage))
    assert tool_answer.text.startswith("error: no region 'T9.99'")


def test_the_model_driven_path_runs_with_a_tiny_in_process_model(
    wsi_dir: Path, feature_cache: Path, taught_vlm: Path
) -> None:
    """Mechanics, not quality: a tiny random VLM answers every agent; its unusable answers
    fall back to the measured strategy, and the run says so."""
    model = TransformersChatModel(
        role="describer",
        settings=RoleConfig(
            backend="transformers", model=str(taught_vlm), max_tokens=24, structured_retries=0
        ),
    )
    context = make_context(
        feature_cache, model=model, trajectories=1, budget=2, regions_per_step=1, min_regions=1
    )
    run = analyse(wsi_dir / "CMU-1-Small-Region.svs", context)
    assert len(run.state["regions"]) == context.settings.budget
    assert run.state["report"].findings
    warnings = " ".join(run.state["warnings"])
    for agent in ("navigate", "describe", "diagnose", "report"):
        assert agent in warnings
