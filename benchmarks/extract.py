"""Structured extraction throughput: rule-based extractor speed, model extractor concurrency.

1. **Rules.** Reports per second of ``extract_fields`` (the offline default: organ detection,
   every field's finder, AJCC derivation) over the 722 TCGA dev reports on one core, against
   the peer a registry would write first: one plain ``pT`` regex per report. The ratio says
   what the full extractor costs per report relative to that; its T accuracy over all records
   is printed beside the regex's. Target: >= 200 reports/s.
2. **Model extractor.** ``extract_fields(..., model=…)`` through the real OpenAI client against
   a local OpenAI-compatible server on 127.0.0.1 that answers every request after a fixed
   latency (``--latency``, 0.25 s) with a valid quoted answer. Reports/s at 1 and at
   ``--concurrency`` (16) parallel requests, against the ideal rate concurrency / latency.
   Target: >= 90 % of ideal at 16.

Needs ../shared/data or HISTOPILOT_TEST_DATA. About a minute on 2 cores:

    python benchmarks/extract.py [--latency 0.25] [--concurrency 16] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from histopilot.config import RoleConfig
from histopilot.serve.openai_backend import openai_chat_model
from histopilot.tools.extract import extract_fields
from histopilot.tools.report.schemas import category_group

DATA = Path(os.environ.get("HISTOPILOT_TEST_DATA", Path(__file__).parents[2] / "shared" / "data"))
PLAIN_PT = re.compile(r"\bp\s?T\s?([0-4])")


def load_reports() -> list[dict]:
    path = DATA / "reports" / "tcga_reports_gold_dev.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rules(reports: list[dict]) -> dict:
    torch.set_num_threads(1)
    texts = [r["text"] for r in reports]
    started = time.perf_counter()
    ours = [extract_fields(t)[1] for t in texts]
    ours_s = time.perf_counter() - started
    started = time.perf_counter()
    plain = [PLAIN_PT.search(t) for t in texts]
    plain_s = time.perf_counter() - started
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


def serve(latency: float) -> ThreadingHTTPServer:
    """An OpenAI-compatible server answering each chat completion after ``latency`` seconds,
    with an answer that quotes the report's first pT (a stand-in for a model)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            report = body["messages"][-1]["content"]
            found = PLAIN_PT.search(report)
            answer = (
                {"pT": {"value": f"pT{found.group(1)}", "quote": found.group(0)}} if found else {}
            )
            time.sleep(latency)
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

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def model_rate(texts: list[str], model, concurrency: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(lambda t: extract_fields(t, model=model, combined=False), texts))
    return len(texts) / (time.perf_counter() - started)


def model_extractor(reports: list[dict], latency: float, concurrency: int) -> dict:
    server = serve(latency)
    host, port = server.server_address[:2]
    settings = RoleConfig(
        backend="openai", model="bench", base_url=f"http://{host}:{port}/v1", max_retries=0
    )
    model = openai_chat_model("extractor", settings)
    texts = [r["text"] for r in reports]
    extract_fields(texts[0], model=model, combined=False)  # warm: schema, client, connection
    serial = model_rate(texts[:8], model, 1)
    parallel = model_rate(texts[: concurrency * 6], model, concurrency)
    server.shutdown()
    return {
        "latency_s": latency,
        "reports_per_s_serial": serial,
        "ideal_serial": 1 / latency,
        f"reports_per_s_at_{concurrency}": parallel,
        f"ideal_at_{concurrency}": concurrency / latency,
        "share_of_ideal": parallel / (concurrency / latency),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.25)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    reports = load_reports()
    results = {
        "rules": rules(reports),
        "model": model_extractor(reports, args.latency, args.concurrency),
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
