"""Trainer service (QLoRA jobs, checkpoints, the TRAINING lease). Contract: proto/baton/v1/trainer.proto.

Not implemented yet: issue 5 builds it on ``baton.runtime`` and ``baton.lease``.
"""
