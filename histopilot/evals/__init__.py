"""Quality evaluation.

It will own the metrics the field reports (text, image, distribution, classification and
retrieval) and one runner per capability behind ``histopilot eval``.
"""
