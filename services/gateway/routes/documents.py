"""Documents: upload files or ingest a server-side folder, list, show, delete; ingest job progress."""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError

from baton.runtime.errors import EmptyInput, InvalidArgument, PayloadTooLarge, PermissionDenied
from services.gateway.ingest.pipeline import SUPPORTED_SUFFIXES, IngestItem
from services.gateway.routes.deps import gateway_state
from services.gateway.state import GatewayState
from services.gateway.tenancy import current_tenant

router = APIRouter(tags=["documents"])

Tenant = Annotated[str, Depends(current_tenant)]
State = Annotated[GatewayState, Depends(gateway_state)]


class FolderIngest(BaseModel):
    path: str = Field(description="A folder on the gateway's machine, inside BATON_GATEWAY_ALLOWED_ROOTS.")
    collection: str = Field("default", min_length=1, max_length=100)
    wait: bool = Field(False, description="Answer when the ingest is done instead of at once with a job id.")


_UPLOAD_DOC = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "collection": {"type": "string", "default": "default"},
                    },
                    "required": ["files"],
                }
            },
            "application/json": {"schema": FolderIngest.model_json_schema()},
        },
        "required": True,
    }
}


@router.post(
    "/v1/documents",
    summary="Add documents: upload files (multipart) or ingest a server-side folder (JSON {path})",
    openapi_extra=_UPLOAD_DOC,
)
async def add_documents(request: Request, response: Response, tenant: Tenant, state: State) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        return await _upload(request, response, tenant, state)
    if content_type.startswith("application/json"):
        try:
            body = FolderIngest.model_validate_json(await request.body())
        except ValidationError as error:  # read by hand (the route takes two content types): the same 422 as FastAPI
            raise RequestValidationError(error.errors(include_url=False)) from None
        return await _ingest_folder(body, response, tenant, state)
    raise InvalidArgument(
        "send files as multipart/form-data (field 'files') or a folder as JSON {\"path\": ...}",
        reason="UNSUPPORTED_CONTENT_TYPE",
    )


async def _upload(request: Request, response: Response, tenant: str, state: GatewayState) -> dict[str, Any]:
    limit = state.settings.max_upload_bytes
    declared = int(request.headers.get("content-length") or 0)
    if declared > limit:
        raise PayloadTooLarge(f"the upload is {declared / 1e6:.0f} MB, over the {limit / 1e6:.0f} MB limit",
                              reason="UPLOAD_TOO_LARGE")  # fmt: skip
    form = await request.form(max_part_size=limit)
    collection = str(form.get("collection") or "default")
    items = []
    for upload in form.getlist("files"):
        if isinstance(upload, str):
            raise InvalidArgument("'files' must be file parts, not text fields", reason="NOT_A_FILE")
        name = _safe_filename(upload.filename or "")
        items.append(IngestItem(source=f"upload://{collection}/{name}", filename=name, data=await upload.read()))
    if not items:
        raise EmptyInput("no files in the upload; send them in the multipart field 'files'", reason="NO_FILES")
    report = await state.pipeline.ingest(tenant, collection, items)
    failures = [o.error for o in report.outcomes if o.error is not None]
    if len(failures) == len(items):
        first = failures[0]
        if len(items) > 1:
            first.metadata["failed_files"] = str(len(items))
        raise first  # nothing was stored: answer with the (first) reason, as a 4xx
    response.status_code = 200
    return report.to_json()


async def _ingest_folder(body: FolderIngest, response: Response, tenant: str, state: GatewayState) -> dict[str, Any]:
    root = _allowed_folder(body.path, state.settings.allowed_roots)
    job_id = state.jobs.start(tenant, body.collection, root)
    if body.wait:
        return await state.jobs.wait(tenant, job_id)
    response.status_code = 202
    return state.jobs.get(tenant, job_id)


@router.get("/v1/ingest/jobs/{job_id}", summary="Progress and result of a folder ingest")
async def get_ingest_job(job_id: str, tenant: Tenant, state: State) -> dict[str, Any]:
    return state.jobs.get(tenant, job_id)


@router.get("/v1/documents", summary="List documents")
async def list_documents(
    tenant: Tenant, state: State, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:  # fmt: skip
    rows, total = state.catalog.list(tenant, limit=limit, offset=offset)
    return {"total": total, "documents": [row.to_json() for row in rows]}


@router.get("/v1/documents/{document_id}", summary="One document")
async def get_document(document_id: str, tenant: Tenant, state: State) -> dict[str, Any]:
    return state.catalog.get(tenant, document_id).to_json()


@router.delete("/v1/documents/{document_id}", summary="Delete a document and its chunks")
async def delete_document(document_id: str, tenant: Tenant, state: State) -> dict[str, Any]:
    await state.pipeline.delete_document(tenant, document_id)
    return {"id": document_id, "deleted": True}


def _safe_filename(name: str) -> str:
    """The last path component only: an upload named '../../etc/passwd' is stored as 'passwd'."""
    base = PurePath(name.replace("\\", "/")).name.strip()
    if not base or base in {".", ".."}:
        raise InvalidArgument("every uploaded file needs a file name", reason="NO_FILENAME")
    if PurePath(base).suffix.lower() not in SUPPORTED_SUFFIXES:
        supported = ", ".join(sorted(SUPPORTED_SUFFIXES))
        raise InvalidArgument(f"{base}: unsupported file type; supported: {supported}", reason="UNSUPPORTED_FORMAT")
    return base


def _allowed_folder(raw: str, allowed_roots: list[Path]) -> Path:
    if not allowed_roots:
        raise PermissionDenied(
            "ingesting a server-side folder is off; set BATON_GATEWAY_ALLOWED_ROOTS to the folders you allow, or "
            "upload the files",
            reason="FOLDER_INGEST_OFF",
        )
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise InvalidArgument(f"{raw!r} is not an absolute path", reason="RELATIVE_PATH")
    resolved = path.resolve()
    roots = [root.resolve() for root in allowed_roots]
    if not any(resolved.is_relative_to(root) for root in roots):
        raise PermissionDenied(
            f"{raw} is outside the allowed roots ({', '.join(map(str, roots))})", reason="PATH_NOT_ALLOWED"
        )
    if not resolved.is_dir():
        raise InvalidArgument(f"{raw} is not a folder on the gateway's machine", reason="NOT_A_FOLDER")
    return resolved


@router.get("/v1/stats", summary="How much memory the tenant has: documents in the catalog, chunks in the store")
async def stats(tenant: Tenant, state: State) -> dict[str, Any]:
    return {"documents": state.catalog.count(tenant), "chunks": state.store.count(tenant)}
