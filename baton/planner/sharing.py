"""Which jobs can hold the GPU together, and which need the lease to themselves.

Two jobs can share when their peaks fit in the GPU's memory together; the lease then grants both (neither asks for
it exclusively). Otherwise the lease runs them one after another: the lower-priority holder yields (serving sleeps —
vLLM level 1 moves its weights to host RAM — or stops its engine on a CPU; training checkpoints and pauses).
"""

from __future__ import annotations

from itertools import combinations

from baton.planner.catalog import GpuSpec
from baton.planner.plan import GIB, Pairing, Plan, Sharing, gib


def plan_sharing(plans: list[Plan], gpu: GpuSpec) -> Sharing:
    pairings = [_pair(first, second, gpu) for first, second in combinations(plans, 2)]
    alone = [
        plan.job for plan in plans if not any(pairing.fits_together for pairing in pairings if plan.job in pairing.jobs)
    ]
    together = [" + ".join(pairing.jobs) for pairing in pairings if pairing.fits_together]
    apart = [" + ".join(pairing.jobs) for pairing in pairings if not pairing.fits_together]
    parts = [f"Can share the GPU: {', '.join(together)}." if together else "No two jobs fit together."]
    if apart:
        parts.append(f"One at a time (the lease hands over): {', '.join(apart)}.")
    if alone:
        parts.append(f"Need the GPU to themselves: {', '.join(alone)}.")
    summary = " ".join(parts)
    return Sharing(gpu=gpu, pairings=pairings, exclusive=alone, summary=summary)


def _pair(first: Plan, second: Plan, gpu: GpuSpec) -> Pairing:
    total = first.vram.total_bytes + second.vram.total_bytes
    fits = total <= gpu.memory_bytes
    sizes = f"{first.vram.total_bytes / GIB:,.1f} + {second.vram.total_bytes / GIB:,.1f} = {gib(total)}"
    if fits:
        how = f"{sizes} <= {gib(gpu.memory_bytes, 0)}: both hold the lease at once"
    else:
        how = f"{sizes} > {gib(gpu.memory_bytes, 0)}: one at a time, the other yields ({_yield_note(first, second)})"
    return Pairing(jobs=(first.job, second.job), vram_bytes=total, fits_together=fits, how=how)


def _yield_note(first: Plan, second: Plan) -> str:
    serving = next((plan for plan in (first, second) if plan.job == "serving"), None)
    if serving is None:
        return "the lower priority waits or checkpoints and pauses"
    offload = serving.host_ram.get("weights offloaded while asleep")
    return f"serving sleeps and moves {gib(offload, 0)} of weights to host RAM, or stops its engine"
