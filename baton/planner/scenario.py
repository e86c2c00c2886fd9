"""Several plans for one GPU in one report, and the bundled scenario: the user's own case (``--scenario seed``)."""

from __future__ import annotations

from baton.planner.catalog import GpuSpec, gpu, model
from baton.planner.models import ModelArch
from baton.planner.plan import Plan, Report, gib
from baton.planner.rag import RagJob, plan_rag
from baton.planner.serving import ServingJob, plan_serving
from baton.planner.sharing import plan_sharing
from baton.planner.training import TrainingJob, plan_training

SCENARIOS = ("seed",)


def build_report(
    arch: ModelArch,
    device: GpuSpec,
    *,
    training: TrainingJob | None = None,
    rag: RagJob | None = None,
    serving: ServingJob | None = None,
    title: str = "",
) -> Report:
    """Plan each given job on ``device``, then how they share it, with short answers."""
    plans: list[Plan] = []
    if serving is not None:
        plans.append(plan_serving(arch, serving, device))
    if training is not None:
        plans.append(plan_training(arch, training, device))
    if rag is not None:
        plans.append(plan_rag(rag, device))
    sharing = plan_sharing(plans, device) if len(plans) > 1 else None
    answers = _answers(arch, device, plans, serving, training)
    return Report(title=title or f"{arch.name} on {device.name}", plans=plans, sharing=sharing, answers=answers)


def seed_scenario() -> Report:
    """Qwen3-30B-A3B: QLoRA on 10 M tokens of the user's texts, memory over 1 M pages, served with adapters, on one
    RTX PRO 6000 Blackwell (96 GB)."""
    return build_report(
        model("qwen3-30b-a3b"),
        gpu("rtx-pro-6000"),
        serving=ServingJob(context_len=32768, concurrent_seqs=4, max_loras=4),
        training=TrainingJob(method="qlora", rank=16, seq_len=2048, dataset_tokens=10_000_000),
        rag=RagJob(pages=1_000_000, tokens_per_page=500, embedding_model="multilingual-e5-large",
                   text_bytes_per_token=3.5),
        title="Seed scenario: Qwen3-30B-A3B, QLoRA on 5-10 M tokens, memory over 1 M pages, one RTX PRO 6000 (96 GB)",
    )  # fmt: skip


def scenario(name: str) -> Report:
    if name == "seed":
        return seed_scenario()
    from baton.runtime.errors import InvalidArgument

    raise InvalidArgument(f"scenario {name!r} is unknown; use one of {', '.join(SCENARIOS)}", reason="UNKNOWN_SCENARIO")


def _answers(
    arch: ModelArch, device: GpuSpec, plans: list[Plan], serving: ServingJob | None, training: TrainingJob | None
) -> list[str]:
    by_job = {plan.job: plan for plan in plans}
    answers = []
    if "rag" in by_job:
        rag = by_job["rag"]
        answers.append(
            f"Building the memory needs only the embedding model ({rag.model}, {gib(rag.vram.total_bytes)} of VRAM), "
            f"not the language model; {rag.facts['chunks']:,} chunks take {gib(rag.disk.total_bytes)} on disk and "
            f"about {_hours(rag.time.seconds)} to embed and store."
        )
    if "serving" in by_job and "training" in by_job:
        answers.append(_coexistence(arch, device, by_job["serving"], by_job["training"], serving, training))
    if "training" in by_job:
        plan = by_job["training"]
        biggest = max(plan.vram.items, key=lambda item: item.bytes)
        answers.append(
            f"Training: peak {gib(plan.vram.total_bytes)} ({plan.verdict.status.replace('_', ' ')}); the largest "
            f"item is {biggest.name} ({gib(biggest.bytes)}). At ~{plan.time.rates['tokens_per_s']:,.0f} tokens/s "
            f"an epoch of {training.dataset_tokens if training else 0:,} tokens takes about "
            f"{_hours(plan.time.seconds)} (half that for half the tokens): the bottleneck is compute, not memory."
        )
    return answers


def _coexistence(
    arch: ModelArch,
    device: GpuSpec,
    serving_plan: Plan,
    training_plan: Plan,
    serving: ServingJob | None,
    training: TrainingJob | None,
) -> str:
    both = serving_plan.vram.total_bytes + training_plan.vram.total_bytes
    if both <= device.memory_bytes:
        return (
            f"The served model can stay in VRAM while training: {gib(serving_plan.vram.total_bytes)} + "
            f"{gib(training_plan.vram.total_bytes)} = {gib(both)} fits in {gib(device.memory_bytes)}."
        )
    text = (
        f"The served model cannot stay in VRAM while training: {gib(serving_plan.vram.total_bytes)} + "
        f"{gib(training_plan.vram.total_bytes)} = {gib(both)} > {gib(device.memory_bytes)}. The lease makes "
        "serving yield while training runs (vLLM sleeps and keeps its weights in host RAM; chat waits or is "
        "answered after training)."
    )
    if serving is not None and training is not None:
        fp8 = plan_serving(arch, serving.model_copy(update={"weights": "fp8", "kv_dtype": "fp8"}), device)
        lean = training.model_copy(update={"quantize_experts": True})
        lean_training = plan_training(arch, lean, device)
        pair = fp8.vram.total_bytes + lean_training.vram.total_bytes
        if pair <= device.memory_bytes:
            text += (
                f" Both would fit ({gib(pair)}) with fp8 serving ({gib(fp8.vram.total_bytes)}) and a trainer that "
                f"quantises the MoE experts ({gib(lean_training.vram.total_bytes)})."
            )
    return text


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 3600 else f"{seconds / 60:,.0f} min"
