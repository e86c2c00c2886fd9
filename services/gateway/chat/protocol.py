"""OpenAI's chat and model shapes as the gateway speaks them (after vLLM's entrypoints/openai protocol models),
with baton's extensions under one ``baton`` field that plain clients ignore.

Unknown request fields are ignored, as OpenAI-compatible servers do, except inside ``baton`` (our namespace: a typo
there is an error). Only text is answered: ``tools``, JSON modes, ``logprobs``, images and ``n`` > 1 are refused
(422) rather than half-served.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from baton.store.base import SearchMode

MAX_STOP_STRINGS = 16  # the inference service's limit
UINT32_MAX = 2**32 - 1


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str = Field(description="Only 'text' is supported.")
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="'developer' is treated as 'system'. Tool messages are not supported."
    )
    content: str | list[TextPart] | None = Field(None, description="Text, or a list of text parts.")
    name: str | None = Field(None, max_length=256)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)

    @field_validator("content")
    @classmethod
    def _text_only(cls, content: str | list[TextPart] | None) -> str | list[TextPart] | None:
        if isinstance(content, list) and any(part.type != "text" for part in content):
            raise ValueError("only text content parts are supported (type 'text')")
        return content


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="Send a last chunk with usage (and empty choices).")


class BatonChatOptions(BaseModel):
    """baton's extensions: answer from the tenant's memory (RAG) and how to search it."""

    model_config = ConfigDict(extra="forbid")

    rag: bool | None = Field(None, description="Use memory for this chat [server default, BATON_GATEWAY_CHAT_RAG].")
    collection: str | None = Field(None, min_length=1, max_length=100, description="Search this collection only.")
    k: int | None = Field(None, ge=1, le=1000, description="Chunks to retrieve [BATON_GATEWAY_CHAT_K].")
    mode: SearchMode = Field(SearchMode.HYBRID, description="hybrid (default), vector or bm25.")
    history_turns: int = Field(
        0, ge=0, le=10, description="Earlier user turns added to the search query (for follow-up questions)."
    )
    sources: int | None = Field(
        None, ge=0, le=1000, description="Most numbered sources packed (0: as many as fit) [the gateway's default]."
    )
    sentences: int | None = Field(
        None, ge=0, le=1000,
        description="Sentences kept of each source, those nearest the question (0: whole passages) [default].",
    )  # fmt: skip
    min_relative_score: float | None = Field(
        None, ge=0, le=1, description="Leave out chunks scoring below this share of the best one's score [default]."
    )
    labels: bool | None = Field(
        None,
        description="Start each source with its number and title ('[1] Title — Heading'), so that the model can "
        "cite by number [a chat model: off, measured better for small models; a base model: on].",
    )
    grounding: float | None = Field(
        None, ge=0, le=10,
        description="Context-aware decoding weight: how much more the sources count than what the model says "
        "without them (0: off; used only where the engine runs it, the hf engine) [BATON_GATEWAY_CHAT_GROUNDING].",
    )  # fmt: skip


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(
        None, max_length=256, description="The base model's id or an adapter's name (GET /v1/models) [base model]."
    )
    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=UINT32_MAX, description="Most tokens to generate.")
    max_completion_tokens: int | None = Field(None, ge=1, le=UINT32_MAX, description="Same as max_tokens.")
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP_STRINGS} strings that end the answer.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="Only 1 choice is supported.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    top_k: int | None = Field(None, ge=1, le=UINT32_MAX, description="vLLM extension.")
    min_p: float | None = Field(None, ge=0, le=1, description="vLLM extension.")
    repetition_penalty: float | None = Field(None, gt=0, le=10, description="vLLM extension.")
    user: str | None = Field(None, description="Ignored.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Extra chat template variables, e.g. {'enable_thinking': false} (vLLM extension)."
    )
    baton: BatonChatOptions | None = None
    # Declared only to refuse them: ignoring them would answer something other than what was asked.
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported (refused when non-empty).")
    response_format: dict[str, Any] | None = Field(None, description="Only {'type': 'text'}.")
    logprobs: bool | None = Field(None, description="Not supported (refused when true).")

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if tools:
            raise ValueError("tools (function calling) are not supported by this server")
        return tools

    @field_validator("response_format")
    @classmethod
    def _text_only_format(cls, response_format: dict[str, Any] | None) -> dict[str, Any] | None:
        if response_format and response_format.get("type") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported (no JSON mode or schemas)")
        return response_format

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, logprobs: bool | None) -> bool | None:
        if logprobs:
            raise ValueError("logprobs are not supported by this server")
        return logprobs

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings")
        return stop

    def sampling(self) -> dict[str, Any]:
        """SamplingParams fields that were set."""
        values: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_completion_tokens or self.max_tokens,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
        }
        sampling = {key: value for key, value in values.items() if value is not None}
        if self.stop:
            sampling["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return sampling


# ------------------------------------------------------------------------------------------------ responses


class Citation(BaseModel):
    index: int = Field(description="n of the [n] marker in the answer.")
    marker: str
    document_id: str
    title: str
    heading: str
    page: int | None
    source: str
    collection: str
    chunk_id: str = Field(description="The best-scoring chunk of this source.")
    chunk_ids: list[str] = Field(description="Every chunk merged into this source, in document order.")
    score: float
    compressed: bool = Field(description="Sentences were left out to fit the context budget.")
    snippet: str
    cited: bool | None = Field(description="Whether the answer used this source (null when no answer was given).")
    cited_by: Literal["marker", "content"] | None = Field(
        description="How that was decided: the answer's [n] markers, or (an answer without markers) the source that "
        "holds most of the answer's words beyond the question's."
    )


class RagStats(BaseModel):
    retrieved: int
    packed: int
    duplicates: int
    merged: int
    compressed: int
    focused: int = Field(description="Sources shortened to their sentences nearest the question.")
    left_out: int
    budget_tokens: int
    prompt_tokens: int | None
    reserved_tokens: int
    max_model_len: int
    token_counts: Literal["local", "service"] = Field(
        description="Who counted the tokens: the served model's tokenizer loaded in the gateway (same files, same "
        "hash), or the inference service (CountTokens)."
    )
    grounding: float = Field(
        description="The context-aware decoding weight the answer was generated with (0: plain decoding)."
    )


class BatonResult(BaseModel):
    citations: list[Citation]
    rag: RagStats | None = Field(description="null when memory was not used.")
    timings: dict[str, float]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    baton: BatonResult


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    """One SSE event (``data: {...}``); the stream ends with ``data: [DONE]``. The last chunk before it carries
    ``baton`` (citations); with stream_options.include_usage that is a chunk with empty choices and ``usage``."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    baton: BatonResult | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "baton"
    root: str
    parent: str | None = Field(description="For an adapter: the base model it runs on.")
    max_model_len: int
    baton: dict[str, Any] = Field(description="kind (base/adapter) and details: engine, or version, rank, resident.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None
    details: dict[str, str] | None = None
    retry_after_s: float | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
