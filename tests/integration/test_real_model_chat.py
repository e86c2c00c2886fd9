"""Chat with a real base model that has no chat template (Gemma 3 270M) through the gateway, with the `openai`
client: the gateway writes a completion-style prompt (sources, question, "Answer:") instead of a chat, stops the
answer at a blank line, counts that prompt exactly, and the answer uses and cites the source.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from baton.clients.inference import InferenceClient
from baton.v1 import inference_pb2
from tests.fixtures.embedder import EmbedderHandle
from tests.integration.real_model_stack import real_model_stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

DOCUMENTS = {
    "garden.md": "# Growing tomatoes\n\nTomatoes need at least six hours of direct sunlight a day. Water them deeply "
    "twice a week, and add mulch to keep the soil moist.\n",
    "comets.md": "# Comets\n\nHalley's comet returns to the inner solar system every 76 years; its last visit was in "
    "1986 and the next is due in 2061. Its nucleus is about fifteen kilometres long.\n",
    "bread.md": "# Sourdough basics\n\nA sourdough starter is a culture of wild yeast and lactic acid bacteria. "
    "Feed it flour and water every day.\n",
}
QUESTION = "How often does Halley's comet return to the inner solar system?"


def test_a_base_model_answers_from_a_source_and_cites_it(
    embedder_service: EmbedderHandle, gemma3: Path, tmp_path: Path
) -> None:
    with real_model_stack(embedder_service, gemma3, tmp_path) as stack:
        with stack.gateway.client("gemma") as memory:
            report = memory.upload_texts(list(DOCUMENTS.items()))
        ids = {Path(d["source"]).name: d["id"] for d in report["documents"]}
        client = stack.openai("gemma")
        info = asyncio.run(_info(stack.inference.target))
        assert not info.has_chat_template, "Gemma 3 270M is a base model: no chat template"
        request = {"model": info.model_id, "messages": [{"role": "user", "content": QUESTION}]}
        request |= {"max_tokens": 48, "temperature": 0}

        answer = client.chat.completions.create(**request)
        text = answer.choices[0].message.content
        assert "76 years" in text and text == text.strip(), text
        assert answer.choices[0].finish_reason == "stop", "the blank-line stop ends a base model's answer"
        cited = [c for c in answer.baton["citations"] if c["cited"]]
        assert [(c["document_id"], c["cited_by"]) for c in cited] == [(ids["comets.md"], "content")]
        rag = answer.baton["rag"]
        assert rag["prompt_tokens"] == answer.usage.prompt_tokens, "the completion prompt is counted exactly"

        stream = client.chat.completions.create(**request, stream=True)
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert chunks[-1].baton["citations"] == answer.baton["citations"]

        off = client.chat.completions.create(**request, extra_body={"baton": {"rag": False}})
        assert "76" not in off.choices[0].message.content and off.baton["citations"] == []
        assert off.usage.prompt_tokens < answer.usage.prompt_tokens

        history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What do tomatoes need?"}]
        history += [{"role": "assistant", "content": "Sunlight."}, {"role": "user", "content": QUESTION}]
        follow_up = client.chat.completions.create(**request | {"messages": history})
        assert "76" in follow_up.choices[0].message.content, "earlier turns become Question/Answer lines"


async def _info(target: str) -> inference_pb2.InferenceInfoResponse:
    async with InferenceClient(target) as inference:
        return await inference.info()
