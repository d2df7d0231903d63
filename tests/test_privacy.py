"""Patient data protection: redaction of logs, silent payload loggers, announced egress, and
slide labels that stay unread until asked for.

Every identifier below is made up.
"""

from __future__ import annotations

import io
import json
import logging
import logging.config
import uuid

import pytest

from histopilot.config import RoleConfig, load_config
from histopilot.errors import RegionError
from histopilot.privacy import (
    PAYLOAD_LOGGERS,
    RedactingFilter,
    announce_remote,
    announce_tracing,
    configure_logging,
    is_local_endpoint,
    redact,
    remote_destinations,
    uvicorn_log_config,
)
from histopilot.serve import chat_model
from histopilot.serve.openai_backend import openai_chat_model
from histopilot.slide import open_slide
from histopilot.slide.models import is_protected_image
from histopilot.tools.extract import extract_fields
from tests.openai_stub import OpenAIStub, Reply, completion

REPORT = """\
SURGICAL PATHOLOGY REPORT                         Accession #: S24-01872
Patient: DOE, JANE Q              MRN: 00123456          DOB: 04/07/1961
Medical record #: A7730012        SSN: 123-45-6789       Phone: (555) 010-4477
Referring contact: jane.doe@example.org
Date of procedure: 03/02/2024

DIAGNOSIS: Left breast, lumpectomy: invasive ductal carcinoma, Nottingham grade 2,
2.3 cm, margins negative. Stage pT2 N1a. ER 95% positive, PR 40% positive, HER2 2+
(equivocal), Ki-67 20%. Metastatic carcinoma in 3/15 lymph nodes.
Prior prostate biopsy SP-2023-004411: Gleason score 3+4=7, Grade Group 2.
"""
IDENTIFIERS = [
    "S24-01872",
    "DOE",
    "JANE",
    "00123456",
    "04/07/1961",
    "A7730012",
    "123-45-6789",
    "010-4477",
    "jane.doe@example.org",
    "SP-2023-004411",
]
CLINICAL = [
    "invasive ductal carcinoma",
    "Nottingham grade 2",
    "2.3 cm",
    "pT2 N1a",
    "ER 95% positive",
    "HER2 2+",
    "Ki-67 20%",
    "3/15 lymph nodes",
    "Gleason score 3+4=7",
    "Date of procedure: 03/02/2024",
]


def absent(identifiers: list[str], text: str) -> list[str]:
    """The identifiers that are still in ``text`` (the empty list is the good answer)."""
    return [identifier for identifier in identifiers if identifier in text]


@pytest.fixture
def log_stream():
    """``configure_logging`` writing to a string; the process's logging put back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in PAYLOAD_LOGGERS}
    yield io.StringIO()
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, saved in levels.items():
        logging.getLogger(name).setLevel(saved)
    logging.captureWarnings(False)
    for logger in [root, *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            for added in [f for f in handler.filters if isinstance(f, RedactingFilter)]:
                handler.removeFilter(added)


# -- redaction -------------------------------------------------------------------------------
def test_a_report_loses_its_identifiers_and_keeps_its_diagnosis():
    redacted = redact(REPORT)

    assert absent(IDENTIFIERS, redacted) == []
    assert all(phrase in redacted for phrase in CLINICAL)
    assert "Patient: [REDACTED:name]" in redacted  # labels stay, so a reader sees what went
    assert "MRN: [REDACTED:mrn]" in redacted
    assert "DOB: [REDACTED:dob]" in redacted
    assert "Accession #: [REDACTED:accession]" in redacted
    assert redact(redacted) == redacted


@pytest.mark.parametrize(
    "line",
    [
        "Patient: Smith, John A.",
        "Patient name: John Smith",
        "Name: O'Brien-Smith, Mary",
        "PatientName=SMITH^JOHN^A",
        "ID 4 | Name: Zoë Müller",
    ],
)
def test_names_in_the_shapes_reports_and_dicom_headers_write_them(line):
    assert redact(line).endswith("[REDACTED:name]")


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("Date of birth: April 7, 1961", "dob"),
        ("PatientBirthDate: 19610407", "dob"),
        ("Acc#: SP24-1234", "accession"),
        ("AccessionNumber='2024X00917'", "accession"),
        ("slide S24-01872-A1.svs opened", "accession"),  # slide files named by accession
        ("Patient ID: 998877", "mrn"),
        ("call 555-010-9999 for results", "phone"),
    ],
)
def test_each_kind_of_identifier(text, kind):
    assert f"[REDACTED:{kind}]" in redact(text)


@pytest.mark.parametrize(
    "text",
    [
        "pT2N0M0, pT3a pN1b, ypT1c",
        "Gleason 4+3=7 (Grade Group 3)",
        "ER 90% positive, PR 0%, HER2 3+",
        "tumour 2.3 x 1.5 x 1.0 cm, 12 mm from the margin",
        "Received 03/04/2024, signed out 2024-03-06",
        "Specimen name: left breast, lumpectomy",
        "TCGA-A2-A0T2-01A, ICD-10-CM C50.9, COVID-19",
        "127.0.0.1:54321 GET /api/slides/demo-slide/tiles/12/3_4.jpeg",
    ],
)
def test_clinical_and_technical_text_is_left_alone(text):
    assert redact(text) == text


# -- logs ------------------------------------------------------------------------------------
def test_log_lines_are_redacted_in_messages_arguments_and_tracebacks(log_stream):
    configure_logging(stream=log_stream)
    configure_logging(stream=log_stream)  # again: still one handler, one line per record
    log = logging.getLogger("histopilot.test")

    log.warning("extraction failed for Patient: DOE, JANE Q")
    log.warning("record %s, MRN: %s, after %d tries", "S24-01872", "00123456", 3)
    log.warning("Patient: %s", "DOE, JANE Q")  # the label in the format, the name in the args
    try:
        raise ValueError(f"cannot parse DOB: 04/07/1961 in {REPORT[:60]!r}")
    except ValueError:
        log.exception("extraction of accession S24-01872 failed")

    written = log_stream.getvalue()
    assert absent(IDENTIFIERS, written) == []
    assert written.count("extraction failed for Patient: [REDACTED:name]\n") == 1
    assert "MRN: [REDACTED:mrn], after 3 tries" in written
    assert "ValueError: cannot parse DOB: [REDACTED:dob]" in written  # the traceback is kept


def test_uvicorn_access_lines_keep_their_format_and_lose_the_accession(log_stream):
    configure_logging(stream=log_stream)
    uvicorn_loggers = ["uvicorn", "uvicorn.access", "uvicorn.error"]
    saved = {
        name: (logger.handlers[:], logger.level, logger.propagate)
        for name, logger in ((n, logging.getLogger(n)) for n in uvicorn_loggers)
    }
    try:
        logging.config.dictConfig(uvicorn_log_config())  # what uvicorn.run(log_config=…) does
        access = logging.getLogger("uvicorn.access")
        lines = io.StringIO()
        access.handlers[0].setStream(lines)
        access.info(
            '%s - "%s %s HTTP/%s" %d',
            "127.0.0.1:5000",
            "GET",
            "/api/slides/S24-01872/dzi",
            "1.1",
            200,
        )
        logging.getLogger("histopilot.test").warning("MRN: 00123456")
    finally:
        for name, (handlers, level, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:], logger.propagate = handlers, propagate
            logger.setLevel(level)
    assert '"GET /api/slides/[REDACTED:accession]/dzi HTTP/1.1" 200' in lines.getvalue()
    assert "MRN: [REDACTED:mrn]" in log_stream.getvalue()  # the root handler survived


def extract_through_stub(text: str) -> OpenAIStub:
    """One extraction by the ``extractor`` role against a loopback OpenAI-compatible server."""
    answer = {"pT": {"value": "pT2", "quote": "pT2"}}
    with OpenAIStub() as server:
        server.reply(Reply(body=completion(json.dumps(answer))))
        settings = RoleConfig(
            backend="openai", model="Qwen/Qwen3-8B", base_url=server.base_url, max_retries=0
        )
        _, fields, _ = extract_fields(
            text, "generic", model=openai_chat_model("extractor", settings), combined=False
        )
    assert fields["pT"]["value"] == "pT2"
    return server


def request_options_record() -> None:
    """The DEBUG line openai 1.x clients write for every request: the whole body."""
    body = {"messages": [{"role": "user", "content": f"<report>{REPORT}</report>"}]}
    logging.getLogger("openai._base_client").debug("Request options: %s", {"json_data": body})


def test_request_bodies_never_reach_the_log_even_at_debug(log_stream, monkeypatch):
    monkeypatch.delenv("HISTOPILOT_LOG_PAYLOADS", raising=False)
    configure_logging(logging.DEBUG, stream=log_stream)

    server = extract_through_stub(REPORT)
    request_options_record()
    logging.getLogger("histopilot.test").debug("extraction done")

    assert "DOE, JANE Q" in server.requests[-1].body["messages"][-1]["content"]  # it was sent
    written = log_stream.getvalue()
    assert "extraction done" in written  # DEBUG is on
    assert "openai" not in written and "httpx" not in written
    assert absent(IDENTIFIERS, written) == []
    assert "invasive ductal carcinoma" not in written


def test_payload_logging_is_opt_in_and_still_redacted(log_stream, monkeypatch):
    monkeypatch.setenv("HISTOPILOT_LOG_PAYLOADS", "1")
    configure_logging(logging.DEBUG, stream=log_stream)

    extract_through_stub(REPORT)
    request_options_record()

    written = log_stream.getvalue()
    assert "openai._base_client" in written and "Request options" in written
    assert "invasive ductal carcinoma" in written  # the report text: debugging only
    assert absent(IDENTIFIERS, written) == []


# -- egress ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("http://127.0.0.1:8000/v1", True),
        ("http://127.8.9.10:8000/v1", True),
        ("http://localhost:8000/v1", True),
        ("http://[::1]:8000/v1", True),
        ("http+unix://%2Frun%2Fvllm.sock/v1", True),
        ("http://10.0.0.5:8000/v1", False),
        ("http://192.168.1.20:8000/v1", False),
        ("http://gpu-node:8000/v1", False),
        ("https://api.openai.com/v1", False),
        ("http://localhost.example.com/v1", False),
    ],
)
def test_only_this_machine_is_local(url, local):
    assert is_local_endpoint(url) is local


def test_a_remote_endpoint_is_announced_once_and_loopback_never(caplog):
    remote = f"http://user:secret@gpu-{uuid.uuid4().hex[:8]}:8000/v1?key=abc"
    with caplog.at_level(logging.WARNING, logger="histopilot.privacy"):
        assert announce_remote("describer", remote) is True
        assert announce_remote("describer", remote) is False
        assert announce_remote("describer", "http://127.0.0.1:8000/v1") is False
    (record,) = caplog.records
    message = record.getMessage()
    assert message.startswith("histopilot: the describer role sends slide regions and text")
    assert message.endswith(":8000/v1, which is not this machine")
    assert "secret" not in message and "key=abc" not in message


def test_the_factory_announces_a_role_served_elsewhere(caplog):
    host = f"gpu-{uuid.uuid4().hex[:8]}"
    config = load_config(
        environ={
            "HISTOPILOT_ROLES__EXTRACTOR__BACKEND": "openai",
            "HISTOPILOT_ROLES__EXTRACTOR__MODEL": "Qwen/Qwen3-8B",
            "HISTOPILOT_ROLES__EXTRACTOR__BASE_URL": f"http://{host}:8000/v1",
        }
    )
    with caplog.at_level(logging.WARNING, logger="histopilot.privacy"):
        chat_model("extractor", config)  # builds a client, contacts nothing
        chat_model("extractor", config)
    assert [r.getMessage() for r in caplog.records] == [
        f"histopilot: the extractor role sends report text to http://{host}:8000/v1, "
        "which is not this machine"
    ]
    assert remote_destinations(config, environ={}) == [f"http://{host}:8000/v1 (extractor)"]
    assert remote_destinations(load_config(environ={}), environ={}) == []


def test_tracing_is_a_destination_and_is_announced_once(caplog):
    endpoint = f"https://traces-{uuid.uuid4().hex[:8]}.example.org"
    tracing = {"LANGSMITH_TRACING": "true", "LANGSMITH_ENDPOINT": endpoint}
    assert remote_destinations(load_config(environ={}), environ=tracing) == [
        f"{endpoint} (LangSmith tracing)"
    ]
    with caplog.at_level(logging.WARNING, logger="histopilot.privacy"):
        assert announce_tracing(tracing) is True
        assert announce_tracing(tracing) is False
        assert announce_tracing({"LANGCHAIN_TRACING_V2": "false"}) is False
    assert "every prompt, answer and image" in caplog.records[0].getMessage()


# -- slide labels ----------------------------------------------------------------------------
def test_label_and_macro_are_read_only_when_asked_for(wsi_dir):
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as slide:
        assert {"label", "macro"} <= set(slide.info.associated_images)
        for name in ("label", "macro"):
            with pytest.raises(RegionError, match="patient identifiers"):
                slide.associated_image(name)
            assert slide.associated_image(name, allow_protected=True).ndim == 3
        assert slide.associated_image("thumbnail").ndim == 3


@pytest.mark.parametrize(
    ("name", "protected"),
    [("Label Image", True), ("slide_macro", True), ("overview", True), ("thumbnail", False)],
)
def test_images_named_like_a_label_or_macro_are_protected(name, protected):
    assert is_protected_image(name) is protected
