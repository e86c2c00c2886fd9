"""Inference service (vLLM and hf engines, LoRA hot-loading, the SERVING lease). Contract: inference.proto.

Not implemented yet: issue 4 builds it on ``baton.runtime`` and ``baton.lease``.
"""
