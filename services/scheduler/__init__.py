"""The GPU-lease scheduler: who may use the single GPU now.

``core`` is the state machine (no gRPC), ``store`` persists epochs and held leases in SQLite (WAL), ``servicer``
is the thin gRPC layer, ``server`` wires them together. Run it with ``baton serve scheduler`` or
``python -m services.scheduler``.
"""
