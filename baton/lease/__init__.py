"""The client side of the GPU lease: ``LeaseClient``, ``LeaseRequest``, ``Lease``, ``LeaseLost``, ``LeaseKind``."""

from baton.lease.client import Lease, LeaseClient, LeaseLost, LeaseRequest
from baton.lease.kinds import LeaseKind

__all__ = ["Lease", "LeaseClient", "LeaseKind", "LeaseLost", "LeaseRequest"]
