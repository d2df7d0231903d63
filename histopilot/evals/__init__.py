"""Quality evaluation: the metrics the field reports and one runner per capability.

:mod:`~histopilot.evals.metrics` holds the metrics (text, image, distribution, classification,
retrieval) and imports nothing else from histopilot, so any layer may score with it. The
runners — :mod:`extraction`, :mod:`report_generation`, :mod:`vqa`, :mod:`retrieval`,
:mod:`generation` and :mod:`agent` — sit on top of everything else and each return an
:class:`~histopilot.evals.outputs.Evaluation` that ``histopilot eval TASK`` prints or writes
with its run card (:mod:`~histopilot.evals.card`). This file imports nothing, so that
importing the metrics never loads the runners.
"""
