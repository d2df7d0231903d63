"""Capabilities the agents call, each usable on its own from Python and the CLI.

``stain`` (separation, normalization, augmentation), ``diffusion`` (a conditional tile model,
stain transfer, counterfactuals) and ``image_tools`` (both as LangChain tools). Report schemas,
drafting, FHIR export and structured extraction from free-text reports will join them.
"""
