"""``python -m services.scheduler [flags]`` — run the GPU-lease scheduler (same as ``baton serve scheduler``)."""

from __future__ import annotations

import sys

from baton.runtime.entrypoint import run_service
from services.scheduler.settings import SchedulerSettings

DESCRIPTION = """\
The GPU-lease scheduler: gives the single GPU to one heavy job at a time (serving, training, bulk embedding),
queues the rest by priority with ageing, asks preemptible holders to yield, revokes holders that go silent or
miss their deadline, and stamps every grant with a persisted fencing epoch.

examples:
  python -m services.scheduler --grpc-port 50060 --metrics-port 9460
  BATON_SCHEDULER_VIRTUAL_VRAM_GIB=48 python -m services.scheduler   # a CPU machine posing as a 48 GB card
"""


def main(argv: list[str] | None = None) -> None:
    run_service("scheduler", SchedulerSettings, argv, description=DESCRIPTION, serve="services.scheduler.server:serve")


if __name__ == "__main__":
    main(sys.argv[1:])
