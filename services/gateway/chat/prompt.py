"""How retrieved passages enter the prompt, in one of two formats, chosen by what the served model is:

- ``ChatFormat`` (the model has a chat template): the instruction to cite goes into the system message and never
  changes, and the numbered sources go into the latest user turn, right before the question: the system prompt and
  the earlier turns then stay byte-identical from one turn to the next, so vLLM's prefix cache keeps serving them,
  and the sources sit next to the question they answer. A user's own system message is kept, with the instruction
  appended. The inference service renders the turns with the model's own template.
- ``CompletionFormat`` (a base model without a chat template): the gateway writes the plain text such a model
  continues best — the system message, the instruction and the sources, the conversation as "Question:" /
  "Answer:" lines, and an "Answer:" cue — and stop strings end the answer at a blank line or the next "Question:"
  (a base model would otherwise go on to invent the next question). It is deliberately not a made-up chat template:
  a base model was never trained on one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

Turn = tuple[str, str]  # (role, content), as InferenceClient takes a chat
# What the model is given: a chat for the model's template, or the plain text of a completion prompt.
Prompt = list[Turn] | str

# Short: a 135M model follows a short instruction, and asking it to cite [n] cost a quarter of its right answers
# (it wrote markers instead of facts); citations.py attributes an answer without markers by its content.
CITE_INSTRUCTION = "Answer the question with the exact words of the sources."
COMPLETION_INSTRUCTION = (
    "Answer the question with the help of the numbered sources. Cite the source you used by its number in square "
    "brackets, like [1]."
)
SOURCES_HEADER = "Sources:\n\n"
SOURCE_SEPARATOR = "\n\n"
QUESTION_HEADER = "\n\nQuestion: "
QUESTION_CUE = "Question: "
ANSWER_CUE = "Answer:"
# A base model's answer ends at a blank line or where it starts to write the next question itself.
COMPLETION_STOP = ("\n\n", "\nQuestion:")


class PromptFormat(Protocol):
    """Turns the conversation and the source blocks into what the model reads."""

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop strings the format needs besides the request's own."""
        ...

    def render(self, conversation: Sequence[Turn], sources: Sequence[str] | None) -> Prompt:
        """``sources`` None: no memory used; a list (possibly empty, to measure the frame alone): with sources."""
        ...


def format_source(number: int, title: str, heading: str, page: int | None, text: str, *, labelled: bool = True) -> str:
    """``[n] Title — Heading (p. 3)`` on one line, then the passage; unlabelled: the passage alone."""
    if not labelled:
        return text
    label = title.strip() or "untitled"
    if heading.strip():
        label += f" — {heading.strip()}"
    if page is not None:
        label += f" (p. {page})"
    return f"[{number}] {label}\n{text}"


def last_user_index(conversation: Sequence[Turn]) -> int | None:
    for index in range(len(conversation) - 1, -1, -1):
        if conversation[index][0] == "user":
            return index
    return None


@dataclass(frozen=True)
class ChatFormat:
    stop: tuple[str, ...] = ()

    def render(self, conversation: Sequence[Turn], sources: Sequence[str] | None) -> list[Turn]:
        """The conversation as the model sees it: unchanged without sources; else the instruction in the system
        message and the sources in the latest user turn."""
        messages = list(conversation)
        question_at = last_user_index(messages)
        if sources is None or question_at is None:
            return messages
        role, question = messages[question_at]
        # No "Sources:" header above the numbered blocks: SmolLM2-135M answered 0.35 of XQuAD questions right with
        # one, 0.44 without.
        messages[question_at] = (role, SOURCE_SEPARATOR.join(sources) + QUESTION_HEADER + question)
        if messages and messages[0][0] == "system":
            messages[0] = ("system", f"{messages[0][1].rstrip()}\n\n{CITE_INSTRUCTION}")
        else:
            messages.insert(0, ("system", CITE_INSTRUCTION))
        return messages


@dataclass(frozen=True)
class CompletionFormat:
    stop: tuple[str, ...] = COMPLETION_STOP

    def render(self, conversation: Sequence[Turn], sources: Sequence[str] | None) -> str:
        """System text, then the earlier turns as Question/Answer lines, then (with sources) the instruction and the
        sources, then the latest question and the answer cue. Earlier turns come first and never change, as in the
        chat format, so a prefix cache keeps serving them."""
        question_at = last_user_index(conversation)
        parts = [f"{content.strip()}\n\n" for role, content in conversation if role == "system" and content.strip()]
        for index, (role, content) in enumerate(conversation):
            if index == question_at:
                if sources is not None:
                    parts.append(f"{COMPLETION_INSTRUCTION}\n\n{SOURCES_HEADER}{SOURCE_SEPARATOR.join(sources)}\n\n")
                parts.append(f"{QUESTION_CUE}{content.strip()}\n")
            elif role == "user":
                parts.append(f"{QUESTION_CUE}{content.strip()}\n")
            elif role == "assistant":
                parts.append(f"{ANSWER_CUE} {content.strip()}\n\n")
        return "".join(parts) + ANSWER_CUE


CHAT = ChatFormat()
COMPLETION = CompletionFormat()


def prompt_format(has_chat_template: bool) -> PromptFormat:
    return CHAT if has_chat_template else COMPLETION
