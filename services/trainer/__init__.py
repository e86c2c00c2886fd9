"""The trainer service: (Q)LoRA jobs, checkpoints, resume, the TRAINING lease. Contract: proto/baton/v1/trainer.proto.

``core`` runs the jobs (no gRPC), ``store`` persists them in SQLite (WAL), ``validation``/``basemodel``/``estimate``
check a spec and predict its resources, ``runner`` owns the files and processes shared with the training process
(``worker``, with ``dataset``/``training``/``artifacts``), ``registry`` publishes adapters, ``servicer`` is the thin
gRPC layer and ``server`` wires them together. Run it with ``baton serve trainer`` or ``python -m services.trainer``.
"""
