"""Wiring: settings → store, registry, lease, core and the gRPC servicer.

Start-up recovers every unfinished job from the store before health turns SERVING (calls meanwhile get UNAVAILABLE);
stopping asks the training process to checkpoint (SIGTERM), waits for it, releases the lease, then exits.
"""

from __future__ import annotations

import importlib.util
import logging

from baton.clients.inference import InferenceClient
from baton.runtime.grpc_server import GrpcService, run_until_signalled
from baton.runtime.logging import log_event
from baton.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.core import CoreConfig, TrainerCore
from services.trainer.lease import LeaseProvider, NoLease
from services.trainer.metrics import TrainerMetrics
from services.trainer.registry import AdapterRegistry
from services.trainer.servicer import TrainerServicer
from services.trainer.settings import TrainerSettings
from services.trainer.store import JobStore
from services.trainer.validation import ValidationContext

log = logging.getLogger(__name__)

SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["Trainer"].full_name


def resolve_device(choice: str) -> str:
    """auto: cuda when NVML sees a GPU (without importing torch into the service), else cpu."""
    if choice != "auto":
        return choice
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return "cuda" if pynvml.nvmlDeviceGetCount() > 0 else "cpu"
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library: no GPU to train on
        return "cpu"


def build_leases(settings: TrainerSettings, device: str) -> LeaseProvider:
    wanted = settings.gpu_lease == "always" or (settings.gpu_lease == "auto" and device == "cuda")
    if not wanted:
        return NoLease()
    from baton.lease import LeaseClient
    from services.trainer.lease import TrainingLeases

    return TrainingLeases(LeaseClient(settings.scheduler_addr), exclusive=settings.lease_exclusive)


class InferenceHotLoader:
    """Asks the inference service to load a new adapter version (replace=true: the name now serves it)."""

    def __init__(self, target: str, timeout_s: float) -> None:
        self._target = target
        self._timeout_s = timeout_s

    async def load(self, name: str, relative_path: str) -> None:
        async with InferenceClient(self._target, timeout_s=self._timeout_s) as client:
            await client.load_adapter(name, relative_path, replace=True)


def build_core(settings: TrainerSettings, metrics: TrainerMetrics) -> TrainerCore:
    device = resolve_device(settings.device)
    jobs_dir = settings.resolved_jobs_dir()
    jobs_dir.mkdir(parents=True, exist_ok=True)
    validation = ValidationContext(
        device=device,
        allowed_roots=settings.resolved_allowed_roots(),
        catalog_path=settings.resolved_catalog_path(),
        texts_dir=settings.resolved_texts_dir(),
        default_priority=settings.lease_priority,
        nf4_supported=importlib.util.find_spec("bitsandbytes") is not None,
    )
    config = CoreConfig(
        jobs_dir=jobs_dir,
        texts_dir=settings.resolved_texts_dir(),
        worker_module=settings.worker_module,
        device=device,
        max_queued_jobs=settings.max_queued_jobs,
        max_crash_restarts=settings.max_crash_restarts,
        child_stop_timeout_s=settings.child_stop_timeout_s,
        validation=validation,
    )
    hot_loader = None
    if settings.inference_addr:
        hot_loader = InferenceHotLoader(settings.inference_addr, settings.hot_load_timeout_s)
    return TrainerCore(
        JobStore(settings.resolved_state_path(), durability=settings.durability),
        AdapterRegistry(settings.resolved_adapter_root()),
        build_leases(settings, device),
        config,
        metrics,
        hot_loader,
    )


async def serve(settings: TrainerSettings) -> None:
    core = build_core(settings, TrainerMetrics())
    service = GrpcService("trainer", settings, [SERVICE_NAME])
    trainer_pb2_grpc.add_TrainerServicer_to_server(TrainerServicer(core), service.server)

    async def on_ready() -> None:
        recovered = await core.start()
        log_event(
            log, "trainer.ready", grpc_port=service.port, recovered_jobs=recovered,
            state_path=str(settings.resolved_state_path()), adapter_root=str(settings.resolved_adapter_root()),
            worker=settings.worker_module, lease=settings.gpu_lease,
        )  # fmt: skip

    await run_until_signalled(service, on_ready=on_ready, on_stop=core.close)
