"""Token counts for packing without a round trip: the served model's own tokenizer, loaded in the gateway.

Packing counts every candidate source and the whole prompt; asking the inference service (CountTokens) costs one or
two RPCs per chat. When the service's Info names a model folder this machine can read, and the tokenizer files there
hash to what the service loaded (``tokenizer_sha256``), the gateway loads the same tokenizer with the same code
(``PromptTokenizer``) and converts the chat through the same ``ChatInput`` the RPC would carry — so the counts are the
service's by construction. Anything else (another machine, another tokenizer, a load that failed) keeps the RPC.

The tokenizer loads in the background on first use; chats meanwhile count remotely.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from baton.clients.inference import InferenceClient, chat_input
from baton.runtime.logging import log_event
from baton.v1 import inference_pb2 as pb
from services.gateway.chat.packing import TokenCounts
from services.gateway.chat.prompt import Prompt
from services.inference.prompts import PromptTokenizer, tokenizer_fingerprint
from services.inference.servicer import chat_prompt

log = logging.getLogger(__name__)


class RemoteTokenCounter:
    """packing.TokenCounter over the inference service's CountTokens (its tokenizer and chat template)."""

    source = "service"

    def __init__(self, client: InferenceClient, template_kwargs: dict[str, Any] | None) -> None:
        self._client = client
        self._template_kwargs = template_kwargs

    async def count(self, texts: Sequence[str], prompt: Prompt) -> TokenCounts:
        if not isinstance(prompt, str):
            response = await self._client.count_tokens(texts, chat=prompt, template_kwargs=self._template_kwargs)
            return TokenCounts(list(response.token_counts), response.chat_tokens, response.max_model_len)
        # A completion prompt is counted whole with the special tokens (BOS) Generate adds to a text prompt; the
        # fragments without them: two calls, as one call takes one add_special_tokens for all its texts.
        whole = self._client.count_tokens([prompt], add_special_tokens=True)
        if not texts:
            response = await whole
            return TokenCounts([], response.token_counts[0], response.max_model_len)
        fragments, response = await asyncio.gather(self._client.count_tokens(texts), whole)
        return TokenCounts(list(fragments.token_counts), response.token_counts[0], response.max_model_len)


class LocalTokenCounter:
    """packing.TokenCounter with the served model's tokenizer in this process: what CountTokens would answer."""

    source = "local"

    def __init__(self, tokenizer: PromptTokenizer, max_model_len: int, template_kwargs: dict[str, Any] | None) -> None:
        self._tokenizer = tokenizer
        self._max_model_len = max_model_len
        self._template_kwargs = template_kwargs

    async def count(self, texts: Sequence[str], prompt: Prompt) -> TokenCounts:
        return await asyncio.to_thread(self.count_here, list(texts), prompt)

    def count_here(self, texts: list[str], prompt: Prompt) -> TokenCounts:
        """The same counts on this thread."""
        fragments = self._tokenizer.count(texts, add_special_tokens=False)
        if isinstance(prompt, str):
            whole = self._tokenizer.count([prompt], add_special_tokens=True)[0]
        else:  # through the RPC's own message and its conversion: template kwargs become what the service gets
            chat = chat_prompt(chat_input(prompt, template_kwargs=self._template_kwargs))
            whole = len(self._tokenizer.chat_ids(chat)[0])
        return TokenCounts(fragments, whole, self._max_model_len)


class TokenCounters:
    """Picks the counter for a chat: local once the served model's tokenizer is loaded here, else the RPC."""

    def __init__(self, client: InferenceClient, *, local: bool) -> None:
        self._client = client
        self._local = local
        self._tokenizers: dict[tuple[str, str], asyncio.Task[PromptTokenizer | None]] = {}

    def counter(
        self, info: pb.InferenceInfoResponse, template_kwargs: dict[str, Any] | None
    ) -> LocalTokenCounter | RemoteTokenCounter:
        tokenizer = self._tokenizer(info) if self._local else None
        if tokenizer is not None:
            return LocalTokenCounter(tokenizer, info.max_model_len, template_kwargs)
        return RemoteTokenCounter(self._client, template_kwargs)

    def _tokenizer(self, info: pb.InferenceInfoResponse) -> PromptTokenizer | None:
        if not info.model_path or not info.tokenizer_sha256:
            return None  # an older service, or one that does not say
        key = (info.model_path, info.tokenizer_sha256)
        task = self._tokenizers.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(asyncio.to_thread(_load, *key))
            self._tokenizers[key] = task
        return task.result() if task.done() and task.exception() is None else None


def _load(model_path: str, fingerprint: str) -> PromptTokenizer | None:
    """The tokenizer at ``model_path`` if it is the one the service loaded, else None (the RPC stays)."""
    path = Path(model_path)
    try:
        if not path.is_dir() or tokenizer_fingerprint(path) != fingerprint:
            log_event(log, "gateway.tokens.remote", model_path=model_path, reason="not the service's tokenizer here")
            return None
        tokenizer = PromptTokenizer(path)
    except Exception as error:  # a half-copied folder, a tokenizer transformers cannot load: the RPC still works
        log_event(log, "gateway.tokens.remote", level=logging.WARNING, model_path=model_path, reason=repr(error))
        return None
    log_event(log, "gateway.tokens.local", model_path=model_path)
    return tokenizer
