"""Model backends and the HTTP server.

It will own the chat-model factory (OpenAI-compatible/vLLM, in-process transformers, offline),
the vLLM launch configuration, the FastAPI app and the web viewer.
"""
