"""Capabilities the agents call, each usable on its own from Python and the CLI.

It will own stain tools (classical and diffusion-based), knowledge-base search, report schemas
and drafting, FHIR export and structured extraction from free-text reports.
"""
