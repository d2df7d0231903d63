"""Patient data protection: what histopilot's logs may hold, and where data may go.

Pathology reports and slide file names carry patient identifiers, and logs are the place they
leak from unnoticed: a log line is copied to a terminal scroll-back, a ticket, a central log
store, none of which is meant for protected health information. Two rules follow:

- **Logs never hold identifiers or report text.** :func:`configure_logging` is the one logging
  setup of the CLI and the server. It routes every logger (histopilot's and third-party ones)
  through :class:`RedactingFilter`, which replaces names, record numbers, dates of birth,
  accession numbers, SSNs, phone numbers and e-mail addresses with ``[REDACTED:<kind>]``
  (:func:`redact`). Redaction works on patterns, so free text that names a patient without a
  label ("Mrs Doe presented with …") cannot be caught; that is why the clients that log whole
  request bodies at DEBUG (:data:`PAYLOAD_LOGGERS`) are held at WARNING: report text never
  reaches a log through them. Set ``HISTOPILOT_LOG_PAYLOADS=1`` to let them log (identifiers
  are still redacted, the rest of the report is not): only for debugging on synthetic data.
- **Nothing leaves the machine unless a remote backend is configured**, and then the user is
  told once per process (:func:`announce_remote`, :func:`announce_tracing`). "Local" means
  this host only (loopback, Unix sockets): a server elsewhere on a private network is another
  machine, with its own logs and its own administrators.
"""

from __future__ import annotations

import copy
import ipaddress
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from histopilot.config import ROLE_NAMES, HistopilotConfig

log = logging.getLogger(__name__)

PAYLOADS_ENV = "HISTOPILOT_LOG_PAYLOADS"
#: Loggers of clients that write request or response bodies (prompts, report text, DICOM
#: headers) at DEBUG or INFO. :func:`configure_logging` holds them at WARNING.
PAYLOAD_LOGGERS = (
    "openai",
    "httpx",
    "httpx2",
    "httpcore",
    "httpcore2",
    "urllib3",
    "langchain",
    "langchain_core",
    "langchain_openai",
    "langgraph",
    "langsmith",
    "pydicom",
)

# -- redaction -------------------------------------------------------------------------------
# Labels start at a word boundary, or right after an escaped line break: request bodies logged
# as Python or JSON strings show "...\\nMRN: 00123456" with a literal backslash-n.
_START = r"(?:(?<=\\[nrt])|\b)"
# "MRN: x", "Acc#: x", "PatientID='x'", "Accession # x": any mix of : = # after the label.
_SEPARATOR = r"[ \t]*(?:[:=#][ \t]*)*[\"']?"
# A record, accession or case number: letters, digits and - / . with at least one digit.
_IDENTIFIER = r"(?=[\w./-]*\d)[A-Z0-9](?:[\w./-]*[A-Z0-9])?"
_NUMBER_WORD = r"(?:number|num\.?|no\.?|\#|id)"
_MONTH = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?"
_DATE = (
    rf"\d{{1,4}}[/.-]\d{{1,2}}[/.-]\d{{1,4}}|\d{{8}}"
    rf"|\d{{1,2}}[ \t-]*{_MONTH}[ \t,-]*\d{{2,4}}"
    rf"|{_MONTH}[ \t]*\d{{1,2}}(?:st|nd|rd|th)?,?[ \t]*\d{{4}}"
)
# One word of a name: letters with ' . - inside ("O'Brien-Smith", "A."), possessive so that it
# is taken whole, and never a label (the "MRN" in "Patient: DOE, JANE MRN: 123").
_NAME_WORD = r"[^\W\d_](?:[^\W\d_]|['’.-])*+(?![ \t]*[:=#])"
_NAME = rf"{_NAME_WORD}(?:(?:[ \t]*,[ \t]*|[ \t]+|\^+){_NAME_WORD}){{0,4}}"
# A bare "Name:" counts only where a field starts (line start, after | ; , or a tab), so that
# "Specimen name: left breast" is left alone.
_NAME_LABEL = (
    rf"{_START}patient(?:'s)?(?:[ \t_]*(?:full[ \t]+)?name)?|{_START}pt\.?[ \t]*name"
    r"|(?:^|(?<=[|;,\t])|(?<=\\[nrt]))[ \t]*(?:(?:full|last|first|family|given)[ \t]+|sur)?name"
)


def _labelled(label: str, value: str, separator: str = _SEPARATOR) -> re.Pattern[str]:
    """``label`` (not followed by a letter), a separator, and a ``value`` group."""
    return re.compile(
        rf"(?:{label})(?![a-z]){separator}(?P<value>{value})", re.IGNORECASE | re.MULTILINE
    )


def _bare(value: str) -> re.Pattern[str]:
    """An identifier recognisable by its shape alone; case-sensitive to stay precise."""
    return re.compile(rf"(?P<value>{value})")


#: Applied in order: labelled values first, names last, so a name never swallows a label.
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("email", _bare(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")),
    (
        "dob",
        _labelled(
            rf"{_START}(?:dob|d\.o\.b\.?|date[ \t]+of[ \t]+birth|birth[ \t_]*date|birthday"
            r"|patient[ \t_]*birth[ \t_]*date)",
            rf"{_DATE}|[^\s,;|\\]+",
        ),
    ),
    (
        "ssn",
        _labelled(
            rf"{_START}(?:ssn|social[ \t]+security(?:[ \t]+{_NUMBER_WORD})?)",
            r"\d{3}[ -]?\d{2}[ -]?\d{4}",
        ),
    ),
    ("ssn", _bare(r"(?<![\w-])\d{3}-\d{2}-\d{4}(?![\w-])")),
    (
        "mrn",
        _labelled(
            rf"{_START}(?:mrn|m\.r\.n\.?|mr[ \t]*(?:\#|no\.?|number)"
            rf"|medical[ \t]+record(?:[ \t]*{_NUMBER_WORD})?"
            rf"|med(?:ical)?\.?[ \t]*rec(?:ord)?\.?[ \t]*{_NUMBER_WORD}"
            rf"|(?:other[ \t_]*)?patient[ \t_]*(?:ids?|identifier|number|no\.?|\#)"
            rf"|(?:chart|hospital|unit|nhs)[ \t]*{_NUMBER_WORD}"
            rf"|health[ \t]*card(?:[ \t]*{_NUMBER_WORD})?)",
            _IDENTIFIER,
        ),
    ),
    (
        "accession",
        _labelled(
            rf"{_START}(?:accession(?:[ \t_]*{_NUMBER_WORD})?|acc\.?[ \t]*{_NUMBER_WORD}"
            rf"|case[ \t]*{_NUMBER_WORD}"
            rf"|surgical[ \t]+(?:pathology[ \t]+)?{_NUMBER_WORD}"
            rf"|path(?:ology)?[ \t]*{_NUMBER_WORD})",
            _IDENTIFIER,
        ),
    ),
    # US surgical pathology numbers: prefix, 2- or 4-digit year, serial, and the block or
    # slide suffix that slide file names add (S24-01872, SP24-1234, SP-2024-001234-A1).
    (
        "accession",
        _bare(r"(?<![\w-])[A-Z]{1,4}-?(?:\d{2}|\d{4})-\d{3,7}(?:-[A-Z0-9]{1,4})*(?![\w-])"),
    ),
    (
        "phone",
        _labelled(
            rf"{_START}(?:phone|tel(?:ephone)?|fax|mobile|cell)\.?(?:[ \t]*{_NUMBER_WORD})?",
            r"\+?\(?\d[\d ().-]{5,}\d",
        ),
    ),
    (
        "phone",
        _bare(r"(?<![\w.+-])(?:\+?1[ .-]?)?(?:\(\d{3}\)[ ]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w-])"),
    ),
    ("name", _labelled(_NAME_LABEL, _NAME, r"[ \t]*[:=][ \t]*[\"']?")),
)


def redact(text: str) -> str:
    """``text`` with patient identifiers replaced by ``[REDACTED:<kind>]``; labels stay.

    Kinds: name (after "Patient:", "Patient name:", "Name:", DICOM PatientName), mrn, dob (only
    dates labelled as births), accession (labelled, or shaped like S24-01872), ssn, phone,
    email. Clinical content is left alone: "pT2 N1a", "Gleason 3+4=7", "2.3 cm", "ER 95%",
    procedure dates.
    """
    for kind, pattern in _RULES:
        placeholder = f"[REDACTED:{kind}]"
        text = pattern.sub(
            lambda m, placeholder=placeholder: (
                m.group(0)[: m.start("value") - m.start()] + placeholder
            ),
            text,
        )
    return text


#: Attributes every record has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
}
_TRACEBACKS = logging.Formatter()


class RedactingFilter(logging.Filter):
    """Redacts a record in place: its message, traceback, stack and ``extra`` strings.

    Attach it to handlers (not loggers): a handler's filter sees the records of every logger
    that propagates to it. The record is changed, not dropped, so handlers that run after this
    one see the redacted text too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        _redact_message(record)
        if record.exc_info:
            # Rendered once here, so every formatter prints the redacted text; the exception
            # object goes, so handlers that render it themselves cannot print the original.
            if not record.exc_text:
                record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _RECORD_ATTRIBUTES and isinstance(value, str):
                setattr(record, key, redact(value))
        return True


def _redact_message(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except (TypeError, ValueError, KeyError):
        # Arguments that do not fit the format (a caller's bug): a filter must not raise, and
        # logging's error report would print both raw, so they are redacted together.
        message = f"{record.msg} {record.args!r}"
    clean = redact(message)
    if clean == message:
        return
    # Formatters such as uvicorn's access log read the arguments one by one: keep their shape
    # when redacting the format string and each argument gives the same text.
    if isinstance(record.msg, str) and isinstance(record.args, tuple) and record.args:
        msg = redact(record.msg)
        args = tuple(redact(arg) if isinstance(arg, str) else arg for arg in record.args)
        try:
            if msg % args == clean:
                record.msg, record.args = msg, args
                return
        except (TypeError, ValueError):
            pass
    record.msg, record.args = clean, ()
    # uvicorn prints this format string instead of msg when colouring; its arguments are gone.
    record.__dict__.pop("color_message", None)


class _HistopilotHandler(logging.StreamHandler):
    """The root handler :func:`configure_logging` installs, recognisable when it runs again.

    Without a stream of its own it writes to whatever ``sys.stderr`` is when a record comes,
    as logging's last-resort handler does: a command run by a test runner that swaps stderr
    for a buffer must not leave a handler writing to that buffer once it is closed.
    """

    def __init__(self, stream: IO[str] | None) -> None:
        self._own_stream = stream
        super().__init__(stream)

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return self._own_stream or sys.stderr

    @stream.setter
    def stream(self, value: IO[str] | None) -> None:
        self._own_stream = value if value is not sys.stderr else None


def configure_logging(level: int = logging.WARNING, stream: IO[str] | None = None) -> None:
    """The logging setup of every CLI command and of the server; safe to call again.

    One handler on the root logger writes to ``stream`` (stderr by default) through a
    :class:`RedactingFilter`. Calling again replaces that handler. The filter is also put on
    every handler already installed anywhere (uvicorn's, a library's own), since loggers that
    do not propagate never reach the root. Python warnings are logged too, so they are redacted
    as well. The clients in :data:`PAYLOAD_LOGGERS` are held at WARNING (or ``level`` if
    higher) unless ``HISTOPILOT_LOG_PAYLOADS=1``.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _HistopilotHandler)]:
        root.removeHandler(handler)
    handler = _HistopilotHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(level)
    root.addHandler(handler)
    root.setLevel(level)
    payloads = os.environ.get(PAYLOADS_ENV) == "1"
    for name in PAYLOAD_LOGGERS:  # an earlier call's hold is lifted when payloads are allowed
        logging.getLogger(name).setLevel(
            logging.NOTSET if payloads else max(level, logging.WARNING)
        )
    logging.captureWarnings(True)
    loggers = [root, *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for existing in getattr(logger, "handlers", []):
            if not any(isinstance(f, RedactingFilter) for f in existing.filters):
                existing.addFilter(RedactingFilter())


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's default logging configuration with a :class:`RedactingFilter` on each handler.

    Pass it as ``uvicorn.run(..., log_config=uvicorn_log_config())``: uvicorn installs its
    handlers when the server starts, after :func:`configure_logging` ran, and its loggers do
    not propagate to the root. Access lines carry request paths, which name slides, and slide
    files are often named by accession number.
    """
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact": {"()": f"{__name__}.RedactingFilter"}}
    for handler in config["handlers"].values():
        handler["filters"] = ["redact"]
    return config


# -- egress ----------------------------------------------------------------------------------
#: What each role's requests carry, for the message that says they leave the machine.
_ROLE_SENDS = {
    "orchestrator": "chat messages, slide views and findings",
    "describer": "slide regions and text",
    "diagnoser": "findings and text",
    "reporter": "findings and report text",
    "extractor": "report text",
}
LANGSMITH_DEFAULT_ENDPOINT = "https://api.smith.langchain.com"

_announced: set[str] = set()
_announced_lock = threading.Lock()


def is_local_endpoint(url: str) -> bool:
    """Whether ``url`` is served by this machine: loopback addresses, ``localhost``, Unix
    sockets. Private-network addresses (10.x, 192.168.x) and other host names are not."""
    try:
        parts = urlsplit(url if "://" in url else f"//{url}")
        host = parts.hostname
    except ValueError:
        return False
    if parts.scheme == "unix" or parts.scheme.endswith("+unix"):
        return True
    if not host:
        return False
    host = host.rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    # 0.0.0.0 and :: as a destination connect to this host.
    return address.is_loopback or address.is_unspecified


def announce_remote(role: str, url: str) -> bool:
    """Warn, the first time in this process, that ``role`` sends data to a non-local ``url``.

    Returns whether it warned: False for a local endpoint or one already announced.
    """
    if is_local_endpoint(url) or not first_time(f"endpoint {url}"):
        return False
    log.warning(
        "histopilot: the %s role sends %s to %s, which is not this machine",
        role,
        _ROLE_SENDS.get(role, "its requests"),
        safe_url(url),
    )
    return True


def announce_tracing(environ: Mapping[str, str] | None = None) -> bool:
    """Warn once if LangSmith tracing is on: it sends every prompt, answer and image (slide
    regions, report text) to its endpoint. Returns whether it warned."""
    endpoint = _tracing_endpoint(os.environ if environ is None else environ)
    if endpoint is None or is_local_endpoint(endpoint) or not first_time(f"tracing {endpoint}"):
        return False
    log.warning(
        "histopilot: LangSmith tracing is on (LANGSMITH_TRACING): every prompt, answer and "
        "image is sent to %s, which is not this machine",
        safe_url(endpoint),
    )
    return True


def remote_destinations(
    config: HistopilotConfig, environ: Mapping[str, str] | None = None
) -> list[str]:
    """Where data would go beyond this machine with ``config``, one line per destination:
    ``"http://gpu-node:8000/v1 (describer, diagnoser)"``; empty when everything stays here."""
    roles_by_url: dict[str, list[str]] = {}
    for role in ROLE_NAMES:
        settings = config.roles[role]
        url = settings.base_url
        if settings.backend == "openai" and url and not is_local_endpoint(url):
            roles_by_url.setdefault(safe_url(url), []).append(role)
    lines = [f"{url} ({', '.join(roles)})" for url, roles in roles_by_url.items()]
    store = config.agents.checkpoints or ""
    if store.startswith(("postgres://", "postgresql://")) and not is_local_endpoint(store):
        lines.append(f"{safe_url(store)} (checkpoint database: threads, reports, audit)")
    endpoint = _tracing_endpoint(os.environ if environ is None else environ)
    if endpoint is not None and not is_local_endpoint(endpoint):
        lines.append(f"{safe_url(endpoint)} (LangSmith tracing)")
    return lines


def _tracing_endpoint(environ: Mapping[str, str]) -> str | None:
    """LangSmith's endpoint when its tracing is switched on in ``environ``, else None.

    Read the way the langsmith client reads it: LANGSMITH_ before LANGCHAIN_, the V2 switch
    before the plain one.
    """

    def setting(name: str) -> str | None:
        for namespace in ("LANGSMITH", "LANGCHAIN"):
            value = environ.get(f"{namespace}_{name}", "").strip()
            if value:
                return value
        return None

    switch = setting("TRACING_V2") or setting("TRACING") or ""
    if switch.lower() != "true":
        return None
    return setting("ENDPOINT") or LANGSMITH_DEFAULT_ENDPOINT


def first_time(key: str) -> bool:
    """True the first time this process asks about ``key``: for warnings said once."""
    with _announced_lock:
        if key in _announced:
            return False
        _announced.add(key)
        return True


def safe_url(url: str) -> str:
    """``url`` as it may appear in a message: no user name, password or query (API keys)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
