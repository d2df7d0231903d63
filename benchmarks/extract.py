"""Structured extraction throughput: rule-based extractor speed, model extractor concurrency.

1. **Rules.** Reports per second of ``extract_fields`` (the offline default: organ detection,
   every field's finder, AJCC derivation) over the 722 TCGA dev reports on one core (best of
   ``--repeat`` passes after a warm-up), against the peer a registry would write first: one
   plain ``pT`` regex per report. The ratio says what the full extractor costs per report
   relative to that; its T accuracy over all records is printed beside the regex's.
   Target: >= 200 reports/s.
2. **Model extractor.** The batch path of ``histopilot extract --backend openai`` (JSON lines
   in, records written out, the real OpenAI client and LangChain model) against a local
   OpenAI-compatible server in its own process on 127.0.0.1 that answers every request after a
   fixed latency (``--latency``, 1 s: a 7B model on vLLM takes several seconds to write a
   70-field answer, so 1 s is on the fast side) with a valid quoted answer. Reports/s at 1 and
   at ``--concurrency`` (16) requests in flight, against the ideal rate concurrency / latency,
   with the rules filling and checking the model's answer as they do by default
   (``--model-only`` leaves them out). Target: >= 90 % of ideal at 16.

Needs ../shared/data or HISTOPILOT_TEST_DATA. About a minute on 2 cores:

    python benchmarks/extract.py [--latency 1.0] [--concurrency 16] [--model-only]
                                 [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing import Process, Queue
from pathlib import Path

import torch

from histopilot.config import RoleConfig
from histopilot.serve.openai_backend import openai_chat_model
from histopilot.tools.extract import extract_fields
from histopilot.tools.extract.batch import RecordWriter, run_batch
from histopilot.tools.report.schemas import category_group

DATA = Path(os.environ.get("HISTOPILOT_TEST_DATA", Path(__file__).parents[2] / "shared" / "data"))
PLAIN_PT = re.compile(r"\bp\s?T\s?([0-4])")


def load_reports() -> list[dict]:
    path = DATA / "reports" / "tcga_reports_gold_dev.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def best_of(repeat: int, work) -> tuple[float, list]:
    """The fastest of ``repeat`` timed runs of ``work`` (after one untimed), and its result."""
    result = work()
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        result = work()
        best = min(best, time.perf_counter() - started)
    return best, result


def rules(reports: list[dict], repeat: int) -> dict:
    torch.set_num_threads(1)
    texts = [r["text"] for r in reports]
    ours_s, ours = best_of(repeat, lambda: [extract_fields(t)[1] for t in texts])
    plain_s, plain = best_of(repeat, lambda: [PLAIN_PT.search(t) for t in texts])
    gold = [r["gold"]["t_group"] for r in reports]
    ours_t = sum(category_group(f["pT"]["value"]) == g for f, g in zip(ours, gold, strict=True))
    plain_t = sum(m is not None and f"T{m.group(1)}" == g for m, g in zip(plain, gold, strict=True))
    return {
        "reports": len(texts),
        "histopilot_reports_per_s": len(texts) / ours_s,
        "plain_regex_reports_per_s": len(texts) / plain_s,
        "speed_ratio_vs_plain_regex": plain_s / ours_s,
        "histopilot_t_accuracy_all": ours_t / len(texts),
        "plain_regex_t_accuracy_all": plain_t / len(texts),
    }


class Handler(BaseHTTPRequestHandler):
    """Answers each chat completion after ``server.latency`` seconds with an answer that quotes
    the report's first pT (a stand-in for a model). HTTP/1.1 keeps connections open, as
    vLLM's server does."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; without this, delayed ACKs add ~40 ms.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        report = body["messages"][-1]["content"]
        found = PLAIN_PT.search(report)
        answer = {"pT": {"value": f"pT{found.group(1)}", "quote": found.group(0)}} if found else {}
        time.sleep(self.server.latency)  # type: ignore[attr-defined]
        reply = {
            "id": "bench",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": json.dumps(answer)},
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def _serve_forever(latency: float, ready: Queue) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.latency = latency  # type: ignore[attr-defined]
    ready.put(server.server_address[1])
    server.serve_forever()


def serve(latency: float) -> tuple[Process, int]:
    """The stand-in server in its own process, as a real model server would be: its CPU work
    must not compete with the client's for one interpreter."""
    ready: Queue = Queue()
    process = Process(target=_serve_forever, args=(latency, ready), daemon=True)
    process.start()
    return process, ready.get(timeout=30)


def model_rate(reports: list[dict], model, concurrency: int, combined: bool) -> float:
    """Reports/s through the batch path ``histopilot extract`` uses: JSON lines in, records
    written to a JSON-lines file, ``concurrency`` requests in flight."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "reports.jsonl"
        source.write_text("\n".join(json.dumps(r) for r in reports))
        writer = RecordWriter(Path(folder) / "out.jsonl")
        started = time.perf_counter()
        written, _, failures = run_batch(
            [source],
            lambda text: extract_fields(text, model=model, combined=combined),
            writer,
            concurrency=concurrency,
        )
        elapsed = time.perf_counter() - started
        writer.close()
    if failures or written != len(reports):
        raise RuntimeError(f"the batch lost records: {failures[:3]}")
    return len(reports) / elapsed


def model_extractor(reports: list[dict], latency: float, concurrency: int, combined: bool) -> dict:
    server, port = serve(latency)
    settings = RoleConfig(
        backend="openai", model="bench", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0
    )
    model = openai_chat_model("extractor", settings)
    extract_fields(reports[0]["text"], model=model)  # warm: schema, client, connection
    serial = model_rate(reports[:8], model, 1, combined)
    parallel = model_rate(reports[: concurrency * 10], model, concurrency, combined)
    server.terminate()
    return {
        "latency_s": latency,
        "combined_with_rules": combined,
        "reports_per_s_serial": serial,
        "ideal_serial": 1 / latency,
        f"reports_per_s_at_{concurrency}": parallel,
        f"ideal_at_{concurrency}": concurrency / latency,
        "share_of_ideal": parallel / (concurrency / latency),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--model-only", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    reports = load_reports()
    results = {
        "rules": rules(reports, args.repeat),
        "model": model_extractor(
            reports, args.latency, args.concurrency, combined=not args.model_only
        ),
    }
    r, m = results["rules"], results["model"]
    print(
        f"rules: {r['histopilot_reports_per_s']:.0f} reports/s vs plain pT regex "
        f"{r['plain_regex_reports_per_s']:.0f}/s (ratio {r['speed_ratio_vs_plain_regex']:.4f}); "
        f"T accuracy over all records {r['histopilot_t_accuracy_all']:.3f} vs "
        f"{r['plain_regex_t_accuracy_all']:.3f}"
    )
    print(
        f"model: {m['reports_per_s_serial']:.2f} reports/s serial (ideal {m['ideal_serial']:.2f}); "
        f"{m[f'reports_per_s_at_{args.concurrency}']:.1f}/s at {args.concurrency} parallel "
        f"(ideal {m[f'ideal_at_{args.concurrency}']:.1f}): {m['share_of_ideal']:.1%} of ideal"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
