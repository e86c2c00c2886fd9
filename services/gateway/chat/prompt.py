"""How retrieved passages enter the prompt.

The instruction to cite goes into the system message and never changes, and the numbered sources go into the
latest user turn, right before the question: the system prompt and the earlier turns then stay byte-identical from
one turn to the next, so vLLM's prefix cache keeps serving them, and the sources sit next to the question they
answer. A user's own system message is kept, with the instruction appended.
"""

from __future__ import annotations

from collections.abc import Sequence

Turn = tuple[str, str]  # (role, content), as InferenceClient takes a chat

CITE_INSTRUCTION = (
    "Answer with the help of the numbered sources that come with the user's question. After every statement "
    "taken from a source, cite its number in square brackets, like [1] or [2][3]. Cite only the sources given and "
    "never invent a number. If the sources do not contain the answer, say so, then answer from what you know, "
    "without citations. Answer in the language of the question."
)
SOURCES_HEADER = "Sources:\n\n"
SOURCE_SEPARATOR = "\n\n"
QUESTION_HEADER = "\n\nQuestion: "


def format_source(number: int, title: str, heading: str, page: int | None, text: str) -> str:
    """``[n] Title — Heading (p. 3)`` on one line, then the passage."""
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


def render(conversation: Sequence[Turn], sources: Sequence[str] | None) -> list[Turn]:
    """The conversation as the model sees it. ``sources`` None: unchanged (no memory used); a list (possibly empty,
    to measure the frame alone): the instruction in the system message and the sources in the latest user turn."""
    messages = list(conversation)
    question_at = last_user_index(messages)
    if sources is None or question_at is None:
        return messages
    role, question = messages[question_at]
    block = SOURCES_HEADER + SOURCE_SEPARATOR.join(sources)
    messages[question_at] = (role, block + QUESTION_HEADER + question)
    if messages and messages[0][0] == "system":
        messages[0] = ("system", f"{messages[0][1].rstrip()}\n\n{CITE_INSTRUCTION}")
    else:
        messages.insert(0, ("system", CITE_INSTRUCTION))
    return messages
