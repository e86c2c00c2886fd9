"""The served model's tokenizer and chat template: what Generate, Tokenize and CountTokens all share.

Engines get token ids, never text, so that the prompt the model sees is exactly the one Tokenize shows and
CountTokens counts, whichever engine runs (vLLM would otherwise render and tokenize on its own).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from google.protobuf import json_format

from baton.runtime.errors import InvalidArgument
from baton.v1 import inference_pb2

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class ChatTurn:
    role: Role
    content: str
    name: str = ""


@dataclass(frozen=True)
class ChatPrompt:
    messages: tuple[ChatTurn, ...]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TextTokens:
    ids: list[int]
    starts: list[int]  # code-point offsets (0 for special tokens)
    ends: list[int]


class PromptTokenizer:
    """The base model's Hugging Face tokenizer, loaded from the model folder. Thread-safe for reading."""

    def __init__(self, model_path: Path) -> None:
        from transformers import AutoTokenizer  # heavy import, only where a model is served

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.vocab_size = len(self.tokenizer)
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.generation_defaults = _generation_defaults(model_path)
        self.fingerprint = tokenizer_fingerprint(model_path)

    def render_chat(self, chat: ChatPrompt) -> str:
        if not self.has_chat_template:
            raise InvalidArgument(
                "this model has no chat template (tokenizer_config.json chat_template): send a plain prompt instead",
                reason="NO_CHAT_TEMPLATE",
            )
        if not chat.messages:
            raise InvalidArgument("chat needs at least one message", reason="EMPTY_INPUT")
        if chat.continue_final_message and chat.add_generation_prompt:
            raise InvalidArgument("continue_final_message needs add_generation_prompt=false")
        messages = [_turn_dict(turn) for turn in chat.messages]
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=chat.add_generation_prompt,
                continue_final_message=chat.continue_final_message,
                **chat.template_kwargs,
            )
        except Exception as error:  # jinja raises TemplateError for role orders the template refuses
            raise InvalidArgument(f"the chat template rejected these messages: {error}", reason="BAD_CHAT") from None

    def chat_ids(self, chat: ChatPrompt) -> tuple[list[int], str]:
        rendered = self.render_chat(chat)
        # The template already wrote BOS/role markers: adding special tokens again would double them.
        return self.tokenizer.encode(rendered, add_special_tokens=False), rendered

    def text_ids(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def text_tokens(self, text: str, *, add_special_tokens: bool = True) -> TextTokens:
        encoding = self.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        offsets = encoding["offset_mapping"]
        return TextTokens(list(encoding["input_ids"]), [s for s, _ in offsets], [e for _, e in offsets])

    def count(self, texts: list[str], *, add_special_tokens: bool) -> list[int]:
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        return [len(ids) for ids in encoded]

    def token_texts(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([token_id]) for token_id in ids]


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
)  # fmt: skip


def tokenizer_fingerprint(model_path: Path) -> str:
    """sha256 over the tokenizer's files in ``model_path`` (names and bytes): two folders with the same fingerprint
    tokenize and render chats alike. The gateway compares it before counting tokens with its own copy."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = model_path / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _turn_dict(turn: ChatTurn) -> dict[str, str]:
    message = {"role": turn.role, "content": turn.content}
    if turn.name:
        message["name"] = turn.name
    return message


def _generation_defaults(model_path: Path) -> dict[str, float]:
    """Sampling defaults the model's authors chose (generation_config.json), used when a request leaves them unset."""
    path = model_path / "generation_config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text(encoding="utf-8"))
    keys = ("temperature", "top_p", "top_k", "repetition_penalty")
    return {key: config[key] for key in keys if isinstance(config.get(key), int | float)}


_ROLES: dict[int, Role] = {
    inference_pb2.CHAT_ROLE_SYSTEM: "system",
    inference_pb2.CHAT_ROLE_USER: "user",
    inference_pb2.CHAT_ROLE_ASSISTANT: "assistant",
}


def chat_prompt(chat: inference_pb2.ChatInput) -> ChatPrompt:
    turns = []
    for index, message in enumerate(chat.messages):
        role = _ROLES.get(message.role)
        if role is None:
            raise InvalidArgument(f"chat message {index} has no role (system, user or assistant)", reason="BAD_CHAT")
        turns.append(ChatTurn(role, message.content, message.name))
    kwargs = json_format.MessageToDict(chat.chat_template_kwargs) if chat.HasField("chat_template_kwargs") else {}
    return ChatPrompt(
        messages=tuple(turns),
        add_generation_prompt=chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True,
        continue_final_message=chat.continue_final_message,
        template_kwargs=kwargs,
    )
