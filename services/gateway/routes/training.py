"""Training jobs through the gateway: submit (from your documents, or an uploaded JSONL), follow (JSON or SSE),
list, cancel. Scoped to the caller's tenant: another tenant's job is a 404. The work is in services/gateway/training.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from baton.runtime.errors import BatonError, EmptyInput, Internal, InvalidArgument
from services.gateway.routes.deps import gateway_state
from services.gateway.state import GatewayState
from services.gateway.tenancy import current_tenant
from services.gateway.training import STATE_NAMES, TrainingJobBody

log = logging.getLogger(__name__)
router = APIRouter(tags=["training"])
State = Annotated[GatewayState, Depends(gateway_state)]
Tenant = Annotated[str, Depends(current_tenant)]
JobId = Annotated[str, Path(pattern=r"^[A-Za-z0-9._-]{1,128}$", description="The job's id (job-…).")]
_LIST_FIELDS = ("collections", "document_ids", "target_modules")

_BODY_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": TrainingJobBody.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "The JSONL dataset."},
                        "name": {"type": "string"},
                    },
                    "additionalProperties": True,
                    "description": 'A JSONL dataset ({"text"} or {"messages"} lines) in `file`, and any field '
                    "of TrainingJobBody as a form field (lists repeated).",
                }
            },
        },
    }
}


@router.post(
    "/v1/training/jobs",
    summary="Train an adapter on your documents (JSON body) or on an uploaded JSONL (multipart: file + fields)",
    status_code=202,
    openapi_extra=_BODY_SCHEMA,
)
async def submit_job(request: Request, tenant: Tenant, state: State) -> dict[str, Any]:
    training = state.training
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async with request.form(max_files=1, max_fields=100) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise EmptyInput("send the dataset as the multipart file field `file` (a JSONL file)")
            fields: dict[str, Any] = {k: v for k, v in form.multi_items() if k != "file" and isinstance(v, str)}
            fields |= {k: form.getlist(k) for k in _LIST_FIELDS if k in form}
            body = _validate(fields)
            path = training.store_upload(tenant, upload.file, state.settings.max_upload_bytes)
        return await training.submit(tenant, body, dataset_file=path)
    raw = await request.body()
    if not raw:
        raise EmptyInput('the request body is empty: send a JSON training job, e.g. {"name": "my-views"}')
    try:
        decoded = json.loads(raw)
    except ValueError as error:
        raise InvalidArgument(
            f"the body is not JSON ({error}); send application/json", reason="INVALID_REQUEST"
        ) from None
    return await training.submit(tenant, _validate(decoded))


@router.get("/v1/training/jobs", summary="Your training jobs, newest first")
async def list_jobs(
    tenant: Tenant,
    state: State,
    states: Annotated[
        list[str], Query(description="Only jobs in these states (queued, running, succeeded, ...).")
    ] = [],  # noqa: B006
    page_size: Annotated[int, Query(ge=1, le=500)] = 50,
    page_token: Annotated[str, Query(max_length=1000)] = "",
) -> dict[str, Any]:
    unknown = [s for s in states if s not in STATE_NAMES]
    if unknown:
        raise InvalidArgument(
            f"unknown job states {unknown}; use any of {sorted(STATE_NAMES)}", reason="INVALID_REQUEST"
        )
    return await state.training.jobs(tenant, states, page_size, page_token)


@router.get("/v1/training/jobs/{job_id}", summary="One training job: state, progress, dataset, adapter")
async def get_job(job_id: JobId, tenant: Tenant, state: State) -> dict[str, Any]:
    return await state.training.job(tenant, job_id)


@router.get(
    "/v1/training/jobs/{job_id}/events",
    summary="Follow a job as Server-Sent Events (snapshot, then state/step/eval/checkpoint events until it ends)",
    response_model=None,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
)
async def job_events(
    job_id: JobId,
    tenant: Tenant,
    state: State,
    last_event_id: Annotated[str | None, Header(description="Resume after this event's seq (SSE reconnect).")] = None,
) -> StreamingResponse:
    after = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
    events = await state.training.events(tenant, job_id, after)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_sse(events), media_type="text/event-stream", headers=headers)


@router.delete("/v1/training/jobs/{job_id}", summary="Cancel a job (no adapter version is registered)")
async def cancel_job(job_id: JobId, tenant: Tenant, state: State) -> dict[str, Any]:
    return await state.training.cancel(tenant, job_id)


def _validate(fields: object) -> TrainingJobBody:
    try:
        return TrainingJobBody.model_validate(fields)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors())
        raise InvalidArgument(f"invalid training job: {problems}", reason="INVALID_REQUEST") from None


async def _sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    try:
        async for event in events:
            data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
            # The seq is the SSE id (a reconnecting client sends it back as Last-Event-ID); a snapshot has none.
            head = f"id: {event['seq']}\n" if event["seq"] else ""
            yield f"{head}event: {event['type']}\ndata: {data}\n\n"
    except BatonError as error:
        yield f"event: error\ndata: {json.dumps(error.to_json())}\n\n"
    except Exception:  # the stream has started: an error can only be told as an event
        log.exception("training event stream failed")
        yield f"event: error\ndata: {json.dumps(Internal('internal error; see the gateway log').to_json())}\n\n"
