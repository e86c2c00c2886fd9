"""A lease holder in its own process, for tests that kill it: ``python -m tests.integration.holder TARGET ID``.

Prints one JSON line per lease event (granted, yield_requested, lost) and holds the GPU until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from baton.lease import LeaseClient, LeaseKind, LeaseRequest


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def hold(args: argparse.Namespace) -> None:
    request = LeaseRequest(
        args.holder_id,
        LeaseKind[args.kind],
        vram_bytes=args.vram_bytes,
        priority=args.priority,
        preemptible=args.preemptible,
    )
    async with LeaseClient(args.target) as client:
        lease = await client.acquire(request)
        emit(event="granted", epoch=lease.epoch, lease_id=lease.lease_id)
        await lease.yield_requested.wait()
        emit(event="yield_requested")
        if not args.ignore_yield:
            await lease.release()
            emit(event="released")
            return
        await lease.lost.wait()
        emit(event="lost", reason=lease.lost_reason)
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target")
    parser.add_argument("holder_id")
    parser.add_argument("--kind", default="TRAINING", choices=[k.name for k in LeaseKind])
    parser.add_argument("--vram-bytes", type=int, default=1 << 30)
    parser.add_argument("--priority", type=int, default=0)
    parser.add_argument("--preemptible", action="store_true")
    parser.add_argument("--ignore-yield", action="store_true")
    asyncio.run(hold(parser.parse_args(sys.argv[1:])))


if __name__ == "__main__":
    main()
