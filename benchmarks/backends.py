"""Per-call overhead of histopilot's model backends against calling the model directly.

* transformers backend vs plain transformers (``apply_chat_template`` + ``generate`` +
  ``decode``), same tiny Qwen2.5-VL, same image and prompt, greedy, same token budget;
* openai backend vs the plain ``openai`` SDK, both against the same local OpenAI-compatible
  server on 127.0.0.1 (a scripted one, so the server's own time is near zero and only client
  overhead is measured).

The tiny model makes generation cheap, so the ratio exposes the wrapper's cost; with a real
7B model the same absolute overhead is a rounding error. Run from the repository root:

    python benchmarks/backends.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from histopilot.config import RoleConfig
from histopilot.serve.openai_backend import openai_chat_model
from histopilot.serve.transformers_backend import TransformersChatModel
from tests.openai_stub import OpenAIStub
from tests.tiny_models import describe_question, plain_describe, save, tiny_vlm

MAX_TOKENS = 16


def median_ms(call: Callable[[], object], repeats: int) -> float:
    call()  # warm-up: first-call loading and caches are not per-call overhead
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def transformers_pair(folder: Path, repeats: int) -> tuple[float, float]:
    chat = TransformersChatModel(
        role="describer",
        settings=RoleConfig(backend="transformers", model=str(folder), max_tokens=MAX_TOKENS),
    )
    local = chat.local_model()

    def raw() -> str:
        return plain_describe(local.model, local.processor, MAX_TOKENS)[0]

    messages = describe_question()
    return median_ms(lambda: chat.invoke(messages), repeats), median_ms(raw, repeats)


def openai_pair(repeats: int) -> tuple[float, float]:
    import openai

    with OpenAIStub() as stub:
        settings = RoleConfig(
            backend="openai", model="tiny", base_url=stub.base_url, max_tokens=MAX_TOKENS
        )
        chat = openai_chat_model("describer", settings)
        client = openai.OpenAI(base_url=stub.base_url, api_key="EMPTY")
        messages = describe_question()
        wire = [{"role": "user", "content": messages[0].content}]

        def raw() -> str | None:
            reply = client.chat.completions.create(
                model="tiny", messages=wire, max_completion_tokens=MAX_TOKENS, temperature=0
            )
            return reply.choices[0].message.content

        return median_ms(lambda: chat.invoke(messages), repeats), median_ms(raw, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model, processor = tiny_vlm()
        tiny = save(model, processor, Path(folder) / "tiny-vlm")
        rows = [
            (
                "transformers (in-process)",
                "plain transformers generate",
                *transformers_pair(tiny, args.repeats),
            ),
            ("openai (ChatOpenAI)", "plain openai SDK", *openai_pair(args.repeats)),
        ]
    print(f"median of {args.repeats} calls, {MAX_TOKENS} new tokens, image + text prompt")
    header = ("backend", "histopilot", "peer", "peer time", "overhead", "ratio")
    print("{:<28}{:>12}  {:<30}{:>10}{:>12}{:>8}".format(*header))
    for name, peer, ours, theirs in rows:
        print(
            f"{name:<28}{ours:>10.2f}ms  {peer:<30}{theirs:>8.2f}ms"
            f"{ours - theirs:>+10.2f}ms{ours / theirs:>7.2f}x"
        )


if __name__ == "__main__":
    main()
