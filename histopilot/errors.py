"""Errors a user can cause, each with a message that says what to do next.

The CLI prints these without a traceback and exits with code 2; the API turns them into 4xx
responses with the same message. Anything that is not a ``HistopilotError`` is a bug.
"""


class HistopilotError(Exception):
    """Base class for problems caused by input, configuration or the environment."""


class SlideNotFoundError(HistopilotError):
    """The path does not exist or is not a readable file."""


class UnsupportedSlideFormatError(HistopilotError):
    """No reader recognises the file."""


class CorruptSlideError(HistopilotError):
    """The file looks like a slide but its contents cannot be decoded."""


class MissingMPPError(HistopilotError):
    """A physical-unit operation needs the scan resolution and the file does not declare it."""


class RegionError(HistopilotError):
    """A requested region lies outside the slide or is too large to read at once."""


class NotBrightfieldError(HistopilotError):
    """A brightfield-only analysis was asked of a fluorescence or multi-channel image."""


class OutputError(HistopilotError):
    """An output path cannot be written."""


class ConfigError(HistopilotError):
    """The configuration file or an environment override is missing, malformed or invalid."""


class ModelRequiredError(HistopilotError):
    """A task needs a language model and the role is configured ``offline``."""


class ModelUnavailableError(HistopilotError):
    """A configured model cannot be loaded or its server cannot be reached."""


class ModelRequestError(HistopilotError):
    """The model server understood the request and refused it (4xx other than 401/403/404)."""


class StructuredOutputError(HistopilotError):
    """The model's answer did not match the requested schema after the allowed retries."""


class EncoderError(HistopilotError):
    """A patch or text encoder is unknown, cannot be loaded, or cannot do what was asked."""


class SearchIndexError(HistopilotError):
    """A patch or knowledge index is missing, corrupt, empty or built for another encoder."""


class KnowledgeSourceError(HistopilotError):
    """An ontology, tumour tree or document given to the knowledge base cannot be read."""


class ImageInputError(HistopilotError):
    """An image file or array cannot be used: unreadable, wrong channels, bit depth or size."""


class StainError(HistopilotError):
    """A stain target or normalizer cannot be fitted, loaded or applied."""


class DiffusionError(HistopilotError):
    """A diffusion model, its conditions or a generation request does not fit together."""


class SchemaError(HistopilotError):
    """A report schema, or a value for one of its fields, does not exist or does not fit."""


class ReportInputError(HistopilotError):
    """A report or analysis file cannot be read: missing, malformed, or not the expected kind."""


class TrainingDataError(HistopilotError):
    """Training data cannot be read or converted: missing file, wrong columns, nothing usable."""


class FinetuneError(HistopilotError):
    """A fine-tuning recipe, its model and this machine do not fit together."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), for messages
    that quote a library's error without its whole report."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
