"""GET /v1/models: the base model and every adapter the inference service serves now (OpenAI's shape)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from baton.runtime.errors import NotFound
from baton.v1 import inference_pb2 as pb
from services.gateway.chat.protocol import ModelCard, ModelList
from services.gateway.chat.service import ChatService
from services.gateway.routes.deps import gateway_state
from services.gateway.routes.openai_errors import ERROR_RESPONSES, OpenAIRoute
from services.gateway.state import GatewayState
from services.gateway.tenancy import current_tenant

router = APIRouter(tags=["openai"], route_class=OpenAIRoute, dependencies=[Depends(current_tenant)])
State = Annotated[GatewayState, Depends(gateway_state)]
Tenant = Annotated[str, Depends(current_tenant)]
ENGINES = {pb.INFERENCE_ENGINE_KIND_VLLM: "vllm", pb.INFERENCE_ENGINE_KIND_HF: "hf"}


@router.get("/v1/models", summary="Models to chat with: the base model and its adapters", responses=ERROR_RESPONSES)
async def list_models(state: State, tenant: Tenant) -> ModelList:
    info, adapters = await state.chat.models(tenant)
    return ModelList(data=cards(state.chat, info, adapters))


@router.get("/v1/models/{model}", summary="One model (base or adapter)", responses=ERROR_RESPONSES)
async def get_model(model: str, state: State, tenant: Tenant) -> ModelCard:
    info, adapters = await state.chat.models(tenant)
    for card in cards(state.chat, info, adapters):
        if card.id == model:
            return card
    raise NotFound(f"the model {model!r} does not exist; GET /v1/models lists them", reason="MODEL_NOT_FOUND")


def cards(chat: ChatService, info: pb.InferenceInfoResponse, adapters: list[pb.LoadedAdapter]) -> list[ModelCard]:
    base_details: dict[str, Any] = {"kind": "base", "engine": ENGINES.get(info.engine, "unknown")}
    base_details |= {"dtype": info.dtype, "quantization": info.quantization, "lora": info.lora_enabled}
    base = ModelCard(
        id=info.model_id,
        created=chat.created(info.model_id),
        root=info.model_id,
        parent=None,
        max_model_len=info.max_model_len,
        baton=base_details,
    )
    return [base, *(_adapter_card(info, adapter) for adapter in adapters)]


def _adapter_card(info: pb.InferenceInfoResponse, adapter: pb.LoadedAdapter) -> ModelCard:
    details = {"kind": "adapter", "version": adapter.version, "rank": adapter.rank, "resident": adapter.resident}
    return ModelCard(
        id=adapter.name,
        created=int(adapter.loaded_unix_s),
        root=info.model_id,
        parent=info.model_id,
        max_model_len=info.max_model_len,
        baton=details,
    )
