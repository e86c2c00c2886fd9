"""Wiring: settings → tokenizer, adapter registry, engine, lease, lifecycle, core and the gRPC servicer.

Start-up: the tokenizer and the registry load first (seconds), then the service answers and its health turns
SERVING (asleep counts as serving: a request wakes it). With ``wake_on_start`` (the default) a wake starts at once in
the background: it waits for the SERVING lease, then loads the engine; ``Health`` shows WAKING until it is AWAKE.
An engine that cannot start leaves the service FAILED (health NOT_SERVING) with the reason in ``Health.message``.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

from baton import __version__
from baton.runtime.errors import InvalidArgument
from baton.runtime.files import model_config
from baton.runtime.grpc_server import GrpcService, run_until_signalled
from baton.runtime.logging import log_event
from baton.v1 import inference_pb2, inference_pb2_grpc
from services.inference.adapters import AdapterRegistry, ServedModel
from services.inference.core import CoreLimits, InferenceCore
from services.inference.engine import EngineConfig, EngineInfo, InferenceEngine
from services.inference.lifecycle import LeaseProvider, Lifecycle, NoLease, ServiceState
from services.inference.metrics import InferenceMetrics
from services.inference.prompts import PromptTokenizer
from services.inference.servicer import InferenceServicer
from services.inference.settings import InferenceSettings

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
_GIB = 1 << 30
_ENGINE_KINDS = {"vllm": inference_pb2.INFERENCE_ENGINE_KIND_VLLM, "hf": inference_pb2.INFERENCE_ENGINE_KIND_HF}
_YIELD_METHODS = {
    "sleep": inference_pb2.INFERENCE_YIELD_METHOD_SLEEP,
    "offload": inference_pb2.INFERENCE_YIELD_METHOD_OFFLOAD,
    "restart": inference_pb2.INFERENCE_YIELD_METHOD_RESTART,
    "pause": inference_pb2.INFERENCE_YIELD_METHOD_PAUSE,
}


def resolve_engine(choice: str) -> str:
    if choice != "auto":
        return choice
    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def resolve_device(choice: str) -> str:
    if choice != "auto":
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def engine_config(settings: InferenceSettings, model_path: Path, device: str, max_model_len: int) -> EngineConfig:
    dtype = settings.dtype if settings.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return EngineConfig(
        model_path=model_path,
        device=device,  # type: ignore[arg-type]
        dtype=dtype,  # type: ignore[arg-type]
        max_model_len=max_model_len,
        max_concurrent_requests=settings.max_concurrent_requests,
        enable_lora=settings.enable_lora,
        max_lora_rank=settings.max_lora_rank,
        max_loras=settings.max_loras,
        # Replaced adapters stay loaded until their requests finish: room for a few beyond the served ones.
        max_loaded_adapters=settings.max_loaded_adapters + settings.max_loras,
        max_logprobs=settings.max_logprobs,
        seed=settings.seed,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        cpu_kv_cache_gib=settings.cpu_kv_cache_gib,
        cpu_yield=settings.cpu_yield,
        enforce_eager=settings.enforce_eager,
    )


def make_engine(kind: str, config: EngineConfig) -> InferenceEngine:
    if kind == "vllm":
        from services.inference.engines.vllm_engine import VllmEngine

        return VllmEngine(config)
    from services.inference.engines.hf_engine import HfEngine

    return HfEngine(config)


def model_max_len(model_path: Path, configured: int) -> int:
    config = model_config(model_path)
    config = config.get("text_config", config)
    native = int(config.get("max_position_embeddings") or 2048)
    return min(configured, native) if configured else native


def planned_vram_bytes(settings: InferenceSettings, model_path: Path, device: str, max_model_len: int) -> int:
    """The planner's peak for this model served with these settings (baton.planner.serving): the SERVING lease's
    VRAM estimate unless lease_vram_gib is set."""
    from baton.planner.models import ModelArch
    from baton.planner.serving import ServingJob, serving_memory

    config = model_config(model_path)
    dtype = settings.dtype if settings.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    job = ServingJob(
        engine="hf" if resolve_engine(settings.engine) == "hf" else "vllm",
        weights="float32" if dtype == "float32" else "bfloat16",
        context_len=max_model_len,
        concurrent_seqs=settings.max_concurrent_requests,
        max_loras=settings.max_loras if settings.enable_lora else 0,
        max_lora_rank=settings.max_lora_rank,
        max_num_seqs=settings.max_concurrent_requests,
    )
    return serving_memory(ModelArch.from_config(config, name=model_path.name), job, cpu=device == "cpu").total_bytes


def build_leases(settings: InferenceSettings, device: str, model_id: str, vram_bytes: int) -> LeaseProvider:
    wanted = settings.gpu_lease == "always" or (settings.gpu_lease == "auto" and device == "cuda")
    if not wanted:
        return NoLease()
    from baton.lease import LeaseClient
    from services.inference.lease import ServingLeases

    return ServingLeases(
        LeaseClient(settings.scheduler_addr),
        vram_bytes=vram_bytes,
        priority=settings.lease_priority,
        exclusive=settings.lease_exclusive,
        model_id=model_id,
    )


def info_response(
    settings: InferenceSettings, engine: EngineInfo, model_id: str, model_path: Path, max_model_len: int,
    tokenizer: PromptTokenizer, vram_bytes: int,
) -> inference_pb2.InferenceInfoResponse:  # fmt: skip
    return inference_pb2.InferenceInfoResponse(
        engine=_ENGINE_KINDS[engine.engine],
        engine_version=engine.engine_version,
        model_id=model_id,
        model_path=str(model_path),
        max_model_len=max_model_len,
        vocab_size=tokenizer.vocab_size,
        has_chat_template=tokenizer.has_chat_template,
        lora_enabled=settings.enable_lora,
        max_lora_rank=settings.max_lora_rank,
        max_loras=settings.max_loras,
        max_loaded_adapters=settings.max_loaded_adapters,
        max_concurrent_requests=settings.max_concurrent_requests,
        max_logprobs=settings.max_logprobs,
        dtype=engine.dtype,
        quantization=engine.quantization,
        device=engine.device,
        yield_method=_YIELD_METHODS[engine.yield_method],
        vram_estimate_bytes=vram_bytes,
        version=__version__,
        tokenizer_sha256=tokenizer.fingerprint,
        contrast=engine.contrast,
    )


async def serve(settings: InferenceSettings) -> None:
    if settings.model_path is None:
        raise InvalidArgument(
            "no model: pass --model-path /path/to/model (a local Hugging Face folder) or set "
            "BATON_INFERENCE_MODEL_PATH; `baton demo` builds a tiny one under BATON_HOME/models"
        )
    model_path = settings.model_path.resolve()
    model_id = settings.model_id or model_path.name
    kind = resolve_engine(settings.engine)
    device = resolve_device(settings.device)
    max_model_len = model_max_len(model_path, settings.max_model_len)
    vram_bytes = int(settings.lease_vram_gib * _GIB) or planned_vram_bytes(settings, model_path, device, max_model_len)
    metrics = InferenceMetrics()
    tokenizer = PromptTokenizer(model_path)
    engine = make_engine(kind, engine_config(settings, model_path, device, max_model_len))
    registry = AdapterRegistry(
        settings.resolved_adapter_root(),
        ServedModel.from_folder(model_path, model_id),
        max_rank=settings.max_lora_rank,
        max_bytes=settings.max_adapter_bytes,
    )
    lifecycle = Lifecycle(
        engine,
        build_leases(settings, device, model_id, vram_bytes),
        metrics,
        max_concurrent_requests=settings.max_concurrent_requests,
        queue_capacity=settings.queue_capacity,
        drain_timeout_s=settings.drain_timeout_s,
        yield_method=engine.info.yield_method,
    )
    limits = CoreLimits(
        model_id=model_id,
        max_model_len=max_model_len,
        max_logprobs=settings.max_logprobs,
        max_prompt_bytes=settings.max_prompt_bytes,
        max_wait_s=settings.max_wait_s,
        max_loaded_adapters=settings.max_loaded_adapters,
    )
    core = InferenceCore(engine, lifecycle, tokenizer, registry, limits, metrics)
    info = info_response(settings, engine.info, model_id, model_path, max_model_len, tokenizer, vram_bytes)
    service = GrpcService("inference", settings, [SERVICE_NAME])
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(core, info), service.server)

    async def health_follows_state(state: ServiceState) -> None:
        if service.port:  # started
            await service.set_serving(state not in (ServiceState.LOADING, ServiceState.FAILED))

    lifecycle.on_state_change(health_follows_state)

    async def on_ready() -> None:
        lifecycle.loaded()
        for spec in settings.load_adapters:
            name, _, path = spec.partition("=")
            await core.load_adapter(name.strip(), path.strip(), replace=False)
        if settings.wake_on_start:
            await lifecycle.wake(max_wait_s=math.inf, return_immediately=True)
        log_event(
            log, "inference.ready", grpc_port=service.port, engine=kind, device=device, model=model_id,
            max_model_len=max_model_len, lease=lifecycle.leases.uses_gpu_lease, adapter_root=str(registry.root),
        )  # fmt: skip

    await run_until_signalled(service, on_ready=on_ready, on_stop=core.close)
