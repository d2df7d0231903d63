"""histopilot: an open multi-agent pathology assistant.

Subpackages, lowest first (nothing imports from a package above it):
``slide`` reads whole-slide images; ``retrieval`` and ``tools`` compute on them;
``agents`` orchestrates; ``serve`` and ``cli`` face users.
"""

from histopilot.errors import HistopilotError

__all__ = ["HistopilotError", "__version__"]
__version__ = "0.1.0"
