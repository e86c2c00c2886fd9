"""``python -m services.scheduler [flags]`` — run the GPU-lease scheduler (same as ``baton serve scheduler``)."""

from __future__ import annotations

import asyncio
import sys

from baton.runtime.logging import configure_logging
from baton.runtime.settings import settings_from_args
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
    settings = settings_from_args(SchedulerSettings, argv, prog="baton serve scheduler", description=DESCRIPTION)
    configure_logging("scheduler", level=settings.log_level, fmt=settings.log_format)
    from services.scheduler.server import serve  # heavy imports after logging is set up

    asyncio.run(serve(settings))


if __name__ == "__main__":
    main(sys.argv[1:])
