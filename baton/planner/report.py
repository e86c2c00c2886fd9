"""A plan report as readable text: one table per job, the sharing table, the answers."""

from __future__ import annotations

from baton.planner.plan import GIB, Breakdown, Plan, Report, gib


def render(report: Report) -> str:
    lines = [f"# {report.title}", ""]
    for plan in report.plans:
        lines += _plan(plan)
    if report.sharing is not None:
        lines += ["## Sharing the GPU", ""]
        lines += [f"- {' + '.join(p.jobs)}: {p.how}" for p in report.sharing.pairings]
        lines += ["", report.sharing.summary, ""]
    if report.answers:
        lines += ["## Answers", ""] + [f"- {answer}" for answer in report.answers] + [""]
    return "\n".join(lines)


def _plan(plan: Plan) -> list[str]:
    lines = [
        f"## {plan.job}: {plan.title}",
        "",
        f"GPU: {plan.gpu.name} ({gib(plan.gpu.memory_bytes, 0)}). Verdict: {plan.verdict.summary}",
        "",
        "| | GiB | |",
        "|---|---:|---|",
    ]
    lines += _rows("peak VRAM" if not plan.gpu.cpu else "peak memory", plan.vram)
    lines += _rows("host RAM", plan.host_ram)
    lines += _rows("disk", plan.disk)
    lines += [
        "",
        f"Time: {_duration(plan.time.seconds)}{plan.time.how}",
        f"Lease: {plan.lease.kind}, {gib(plan.lease.vram_bytes)}, "
        f"{'exclusive' if plan.lease.exclusive else 'shared if it fits'}, "
        f"{'preemptible' if plan.lease.preemptible else 'not preemptible'}",
        "",
    ]
    return lines


def _rows(label: str, breakdown: Breakdown) -> list[str]:
    rows = [f"| **{label}** | **{breakdown.total_bytes / GIB:,.2f}** | |"]
    rows += [f"| {item.name} | {item.bytes / GIB:,.2f} | {item.note} |" for item in breakdown.items]
    return rows


def _duration(seconds: float) -> str:
    if not seconds:
        return ""
    return f"{seconds / 3600:,.1f} h — " if seconds >= 3600 else f"{seconds / 60:,.0f} min — "
