"""Capabilities the agents call, each usable on its own from Python and the CLI.

``stain`` (separation, normalization, augmentation), ``diffusion`` (a conditional tile model,
stain transfer, counterfactuals), ``image_tools`` (both as LangChain tools), ``report``
(synoptic schemas, drafting, rendering, FHIR export) and ``extract`` (structured fields from
free-text reports).
"""
