"""The trainer service's gRPC client.

    async with TrainerClient("127.0.0.1:50063") as trainer:
        spec = trainer_pb2.TrainerJobSpec(name="views", tenant="me", base_model_path="/models/m",
                                          jsonl=trainer_pb2.JsonlDataset(path="/data/notes.jsonl"))
        job = await trainer.submit(spec, request_id=str(uuid.uuid4()))
        async for event in trainer.watch(job.job_id, tenant="me"):
            print(event.state, event.progress.step, event.progress.loss)

``watch`` re-attaches by itself when the stream breaks (the service restarted, a network hiccup): it resumes after
the last event it delivered, so a caller sees every event once. Failures come back as the domain errors the server
raised (``baton.runtime.errors``), matched on status code and ``ErrorInfo.reason``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import grpc

from baton.runtime.errors import from_rpc_error
from baton.v1 import trainer_pb2, trainer_pb2_grpc

T = TypeVar("T")
pb = trainer_pb2

TERMINAL_STATES = frozenset({pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED})
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def state_name(state: int) -> str:
    """JOB_STATE_WAITING_FOR_GPU → "waiting_for_gpu"."""
    return pb.JobState.Name(state).removeprefix("JOB_STATE_").lower()


class TrainerClient:
    """A connection to the Trainer service. Cheap to keep; share one per process."""

    def __init__(self, target: str, *, channel: grpc.aio.Channel | None = None, timeout_s: float = 120.0) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._channel = channel or grpc.aio.insecure_channel(target)
        self.stub = trainer_pb2_grpc.TrainerStub(self._channel)

    async def __aenter__(self) -> TrainerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def submit(
        self, spec: pb.TrainerJobSpec, *, request_id: str = "", validate_only: bool = False
    ) -> pb.TrainerJob:
        request = pb.SubmitJobRequest(spec=spec, request_id=request_id, validate_only=validate_only)
        return await self._call(self.stub.SubmitJob, request)

    async def get(self, job_id: str, *, tenant: str = "") -> pb.TrainerJob:
        return await self._call(self.stub.GetJob, pb.GetJobRequest(job_id=job_id, tenant=tenant))

    async def list(
        self, *, tenant: str = "", states: Sequence[int] = (), page_size: int = 0, page_token: str = ""
    ) -> pb.ListJobsResponse:
        request = pb.ListJobsRequest(tenant=tenant, states=list(states), page_size=page_size, page_token=page_token)
        return await self._call(self.stub.ListJobs, request)

    async def cancel(self, job_id: str, *, tenant: str = "") -> pb.TrainerJob:
        return await self._call(self.stub.CancelJob, pb.CancelJobRequest(job_id=job_id, tenant=tenant))

    async def watch(
        self, job_id: str, *, tenant: str = "", after_seq: int = 0, reconnect_s: float = 60.0
    ) -> AsyncIterator[pb.JobEvent]:
        """Every event of the job until it ends (see the module docstring). Gives up when the service stays
        unreachable for ``reconnect_s``."""
        last = after_seq
        down_since: float | None = None
        while True:
            call = self.stub.WatchJob(pb.WatchJobRequest(job_id=job_id, tenant=tenant, after_seq=last))
            try:
                async for event in call:
                    down_since = None
                    if event.seq:
                        last = event.seq
                    yield event
                    if _ends(event):
                        return
                return  # the server ended the stream: the job is over
            except grpc.aio.AioRpcError as error:
                if error.code() not in _RETRYABLE:
                    raise from_rpc_error(error) from None
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > reconnect_s:
                    raise from_rpc_error(error) from None
            finally:
                call.cancel()
            await asyncio.sleep(0.5)

    async def wait(self, job_id: str, *, tenant: str = "", timeout_s: float = 3600.0) -> pb.TrainerJob:
        """Follow the job until it ends; returns it in its terminal state."""
        async with asyncio.timeout(timeout_s):
            async for _event in self.watch(job_id, tenant=tenant):
                pass
        return await self.get(job_id, tenant=tenant)

    async def _call(self, method: Callable[..., Awaitable[T]], request: object) -> T:
        try:
            return await method(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None


def _ends(event: pb.JobEvent) -> bool:
    if event.type == pb.JOB_EVENT_TYPE_SNAPSHOT:
        return event.state in TERMINAL_STATES
    return event.type == pb.JOB_EVENT_TYPE_STATE_CHANGED and event.state in TERMINAL_STATES
