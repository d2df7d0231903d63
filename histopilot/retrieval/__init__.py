"""Similar-tissue and knowledge search.

``encoders`` (the ``PatchEncoder`` contract, the offline default and a registry by name),
``features`` (a slide's tile embeddings with their HDF5 cache), ``patch_index`` and ``vectors``
(FAISS indexes with SQLite metadata), ``search`` (patch and slide queries), ``kb`` (the
knowledge base) and ``tools`` (all of it as LangChain tools for the agents).
"""
