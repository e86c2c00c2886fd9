"""Gateway (FastAPI): the public, OpenAI-compatible HTTP API over the gRPC services.

Not implemented yet: issues 3 and 6 build it; HTTP errors come from ``baton.runtime.errors`` (``http_status``).
"""
