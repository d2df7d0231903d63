"""The safety layer's cost and reach: guardrails and audit overhead, claims found in real
report text, identifiers redacted from it.

1. **Overhead.** An offline analysis of a real slide (warm embedding cache) with the guardrails
   and the audit trail, against the same analysis with both switched off (the peer: the graph
   as it ran before the layer). Runs alternate; medians; ratio. The whole runs differ by less
   than their noise, so the layer's own steps are timed too: guarding the draft and writing
   the audit record (SQLite), as a share of an analysis.
2. **Claims in real report text.** The 722 TCGA reports screened sentence by sentence as if a
   model had written them about an H&E slide. Recall on receptor statements: of the reports
   whose gold record holds an ER, PR or HER2 result and whose text names that marker, the share
   where a sentence naming it is withheld. Against a keyword denylist (the peer: drop every
   sentence that names a marker or gene), the sentences each drops, and how many of the
   denylist's extra drops are limitation sentences ("… recommended", "cannot be assessed").
3. **Redaction.** The same reports with a synthetic header of identifiers (name, MRN, date of
   birth, accession, phone) planted in each: the share of planted identifiers gone after
   :func:`histopilot.privacy.redact`, the share of gold T categories still in the text, and
   the time per report against the rule-based extractor's (the peer: the work a log line
   accompanies).

Run from the repository root (needs ../shared/data or HISTOPILOT_TEST_DATA):

    python benchmarks/guardrails.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from histopilot.agents.audit import AuditLog
from histopilot.agents.checkpoints import open_checkpointer
from histopilot.agents.guardrails import Guard, Material
from histopilot.agents.guardrails.claims import MARKER, MOLECULAR, sentences
from histopilot.agents.guardrails.report import guard_report
from histopilot.privacy import redact
from histopilot.tools.extract.rules import extract_with_rules
from tests.agent_helpers import analyse, make_context

DATA = Path(os.environ.get("HISTOPILOT_TEST_DATA", Path(__file__).parents[2] / "shared" / "data"))
SLIDE = DATA / "wsi" / "CMU-1-Small-Region.svs"
REPORTS = DATA / "reports" / "tcga_reports_gold_dev.jsonl"
H_AND_E = Material(stain="H&E", stain_source="declared", mpp=0.5)
RECEPTORS = {
    "er_status": re.compile(r"\bER\b|estrogen receptor", re.IGNORECASE),
    "pr_status": re.compile(r"\bPR\b|\bPgR\b|progesterone receptor", re.IGNORECASE),
    "her2_ihc_status": re.compile(r"\bHER-?2\b|ERBB2|neu\b", re.IGNORECASE),
}
LIMITATION_WORDS = re.compile(r"recommend|cannot|will be|to follow|pending|reported separately")


def overhead(runs: int) -> dict:
    """The layer's own cost per analysis (guarding the draft, writing its audit record to
    SQLite), against the whole analysis; and whole analyses with and without the layer."""

    class NoAudit:
        def __init__(self, checkpointer) -> None:
            pass

        def records(self, thread_id: str) -> list:
            return []

        def count(self, thread_id: str, kind: str) -> int:
            return 0

        def add(self, record) -> None:
            pass

    def unguarded(draft, guard, **kwargs):
        return draft

    with tempfile.TemporaryDirectory() as folder:
        context = make_context(Path(folder), budget=8, trajectories=3)
        run = analyse(SLIDE, context)  # warms the embedding cache and the imports
        timings: dict[str, list[float]] = {"with": [], "without": []}
        for _ in range(runs):
            started = time.perf_counter()
            analyse(SLIDE, context)
            timings["with"].append(time.perf_counter() - started)
            with (
                mock.patch("histopilot.agents.report.guard_report", unguarded),
                mock.patch("histopilot.agents.run.AuditLog", NoAudit),
            ):
                started = time.perf_counter()
                analyse(SLIDE, context)
                timings["without"].append(time.perf_counter() - started)
        state = run.state
        regions = state["regions"]
        guard = Guard(material=state["material"], regions=set(regions), high_power_seen=True)
        started = time.perf_counter()
        for _ in range(runs * 10):
            guard_report(
                state["report"],
                guard,
                question=None,
                indeterminate=False,
                narrative_by_model=False,
            )
        guard_s = (time.perf_counter() - started) / (runs * 10)
        with open_checkpointer(str(Path(folder) / "threads.sqlite")) as checkpointer:
            log = AuditLog(checkpointer)
            (record,) = run.audit
            started = time.perf_counter()
            for n in range(runs * 10):
                log.add(record.model_copy(update={"id": f"bench#{n}"}))
            audit_s = (time.perf_counter() - started) / (runs * 10)
        context.close()
    with_layer, without = (statistics.median(timings[k]) for k in ("with", "without"))
    return {
        "analysis_s_with_layer": round(with_layer, 3),
        "analysis_s_without": round(without, 3),
        "ratio_end_to_end": round(with_layer / without, 3),
        "guard_report_ms": round(1000 * guard_s, 2),
        "audit_write_ms": round(1000 * audit_s, 2),
        "layer_share_of_analysis": round((guard_s + audit_s) / without, 4),
    }


def claims(reports: list[dict]) -> dict:
    """Receptor statements withheld from real report text, against a keyword denylist."""
    guard = Guard(material=H_AND_E)
    found = {field: [0, 0] for field in RECEPTORS}  # field → [named in text, withheld]
    ours = denylist = limitation_kept = total = 0
    started = time.perf_counter()
    for report in reports:
        text, gold = report["text"], report["gold"]
        withheld = []
        for sentence in sentences(text):
            if not sentence.strip():
                continue
            total += 1
            _, actions = guard.check(sentence, "report")
            # Only what the material decides: a report's block names ("C1") are no regions.
            ok = not any(a.rule in ("immunostain", "molecular") for a in actions)
            named = bool(MARKER.search(sentence) or MOLECULAR.search(sentence))
            ours += not ok
            denylist += named
            if named and ok and LIMITATION_WORDS.search(sentence.lower()):
                limitation_kept += 1
            if not ok:
                withheld.append(sentence)
        for field, pattern in RECEPTORS.items():
            if gold.get(field) and pattern.search(text):
                found[field][0] += 1
                found[field][1] += any(pattern.search(s) for s in withheld)
    seconds = time.perf_counter() - started
    return {
        "sentences": total,
        "withheld_by_guard": ours,
        "dropped_by_denylist": denylist,
        "ratio_denylist_to_guard": round(denylist / max(ours, 1), 2),
        "named_but_kept_limitations": limitation_kept,
        "recall": {
            field: {"reports": named, "withheld": hit, "recall": round(hit / max(named, 1), 3)}
            for field, (named, hit) in found.items()
        },
        "ms_per_report": round(1000 * seconds / len(reports), 3),
    }


def redaction(reports: list[dict]) -> dict:
    """Planted identifiers removed, gold T categories kept, cost against extraction."""
    rng = random.Random(0)
    first = ["Jane", "John", "Maria", "Wei", "Amina", "Carlos", "Olga", "Kenji"]
    last = ["Doe", "Smith", "Okafor", "Nguyen", "Garcia", "Kowalski", "Haddad", "Tanaka"]
    planted = kept_t = had_t = removed = 0
    redact_s = extract_s = 0.0
    for report in reports:
        identifiers = {
            "name": f"{rng.choice(last).upper()}, {rng.choice(first)}",
            "mrn": f"{rng.randrange(10**7, 10**8)}",
            "dob": "/".join(
                (
                    f"{rng.randrange(1, 13):02d}",
                    f"{rng.randrange(1, 29):02d}",
                    f"19{rng.randrange(30, 99)}",
                )
            ),
            "accession": f"S{rng.randrange(10, 25)}-{rng.randrange(1000, 99999)}",
            "phone": f"(617) 555-{rng.randrange(1000, 9999)}",
        }
        header = (
            f"Patient: {identifiers['name']}  MRN: {identifiers['mrn']}  DOB: {identifiers['dob']}"
            f"\nAccession #: {identifiers['accession']}  Phone: {identifiers['phone']}\n"
        )
        text = header + report["text"]
        started = time.perf_counter()
        clean = redact(text)
        redact_s += time.perf_counter() - started
        started = time.perf_counter()
        extract_with_rules(report["text"])
        extract_s += time.perf_counter() - started
        planted += len(identifiers)
        removed += sum(value not in clean for value in identifiers.values())
        t = report["gold"].get("ajcc_pathologic_t") or ""
        mention = re.search(rf"\bp?{re.escape(t)}\w*", report["text"]) if t else None
        if mention:
            had_t += 1
            kept_t += mention.group(0) in clean
    return {
        "identifiers_planted": planted,
        "identifiers_removed": round(removed / planted, 4),
        "gold_t_categories_kept": round(kept_t / max(had_t, 1), 4),
        "ms_per_report_redact": round(1000 * redact_s / len(reports), 3),
        "ms_per_report_rules_extraction": round(1000 * extract_s / len(reports), 3),
        "ratio_redact_to_extraction": round(redact_s / extract_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    reports = [json.loads(line) for line in REPORTS.read_text(encoding="utf-8").splitlines()]
    results = {
        "overhead": overhead(args.runs),
        "claims": claims(reports),
        "redaction": redaction(reports),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
