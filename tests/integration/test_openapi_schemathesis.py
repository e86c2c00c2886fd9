"""schemathesis against the running gateway's own OpenAPI: every operation it publishes, fed generated requests
(valid and not), must never answer 5xx and must answer only what the schema documents — status code, content type,
headers and body.

The stack is real: gateway + embedder (MiniLM) + inference (hf engine, the tiny Qwen3), so chat and /v1/models
answer for real. The tenant holds one document, so searches and chats have memory to find. Admin operations
(/v1/users...) are sent with the admin key, everything else with a user key; a generated Authorization header, when
schemathesis makes one, is replaced, since a wrong key is a 401 that says nothing about the route.

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/integration/test_openapi_schemathesis.py
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hypothesis
import hypothesis.errors
import pytest
import schemathesis
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation.modes import GenerationMode
from schemathesis.schemas import APIOperation

from baton.clients.inference import InferenceClient
from baton.models.tiny import train_phrase_adapter
from tests.conftest import SchedulerHandle
from tests.fixtures.gateway import GatewayHandle
from tests.fixtures.inference import PHRASE_A, InferenceHandle
from tests.fixtures.trainer import TrainerHandle

pytestmark = pytest.mark.integration

TENANT = "schemathesis"
FAKE_WORKER = "tests.fixtures.fake_worker"
# Small, so a generated max_tokens cannot keep the tiny model busy for long.
MAX_MODEL_LEN = 256
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
SETTINGS = hypothesis.settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same cases every run: a failure here is reproducible, not a flake
    suppress_health_check=list(hypothesis.HealthCheck),
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],  # no shrinking: the first failure is reported
    database=None,
)
NOTE = """# Halley's comet

Halley's comet returns to the inner solar system every 76 years; its next visit is due in 2061.
"""


@dataclass
class SchemaStack:
    gateway: GatewayHandle
    inference: InferenceHandle

    def headers_for(self, path: str) -> dict[str, str]:
        key = self.gateway.admin_key if path.startswith("/v1/users") else self.gateway.key(TENANT)
        return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def schema_stack(embedder_service, tiny_llm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SchemaStack]:
    adapters = tmp_path_factory.mktemp("st-adapters")
    train_phrase_adapter(tiny_llm, adapters / "phrase-a", phrase=PHRASE_A, seed=1, steps=2)
    inference = InferenceHandle(
        "hf",
        tmp_path_factory.mktemp("st-inference"),
        tiny_llm,
        adapters,
        scheduler=None,
        extra_args=["--max-model-len", str(MAX_MODEL_LEN)],
    )
    inference.start()
    asyncio.run(_load_adapter(inference.target, "phrase-a"))
    # Every backend the gateway routes to is up, so a 503 is a finding. The trainer runs the stand-in worker:
    # generated requests start jobs, and real training of each would only burn the two cores.
    scheduler = SchedulerHandle(home=tmp_path_factory.mktemp("st-scheduler"), extra_args=[]).start()
    trainer = TrainerHandle(tmp_path_factory.mktemp("st-trainer"), scheduler, worker_module=FAKE_WORKER).start()
    gateway = GatewayHandle(
        home=tmp_path_factory.mktemp("st-gateway"),
        allowed_root=tmp_path_factory.mktemp("st-allowed"),
        embedder_addr=embedder_service.grpc_target,
        extra_args=[
            *("--inference-addr", inference.target),
            *("--trainer-addr", trainer.target),
            *("--scheduler-addr", scheduler.target),
        ],
    )
    gateway.start()
    with gateway.client(TENANT) as client:
        client.upload_texts([("comet.md", NOTE)])
    yield SchemaStack(gateway, inference)
    gateway.stop()
    trainer.stop()
    inference.stop()
    scheduler.stop()


async def _load_adapter(target: str, name: str) -> None:
    async with InferenceClient(target) as client:
        await client.load_adapter(name, name)


@pytest.fixture(scope="module")
def api_schema(schema_stack: SchemaStack) -> schemathesis.BaseSchema:
    # /metrics is Prometheus text mounted beside the API, outside the OpenAPI document; nothing to check there.
    return schemathesis.openapi.from_url(f"{schema_stack.gateway.url}/openapi.json")


# Not schemathesis.pytest.from_fixture: its lazy loader writes pytest's private Function._nodeid, which pytest 9.2
# no longer has (AttributeError). Strategies per operation under hypothesis.given do the same work.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_gateway_honours_its_openapi(
    api_schema: schemathesis.BaseSchema, schema_stack: SchemaStack, mode: GenerationMode
) -> None:
    failures: list[str] = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    for operation in operations:
        failure = run_operation(operation, mode, schema_stack.headers_for(operation.path))
        if failure:
            failures.append(f"{operation.label} ({mode}):\n{failure}")
    assert not failures, f"{len(failures)} operations failed:\n\n" + "\n\n".join(failures)


def run_operation(operation: APIOperation, mode: GenerationMode, headers: dict[str, str]) -> str | None:
    """Generated cases for one operation; the first failure's report, or None."""

    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @SETTINGS
    def check(case: schemathesis.Case) -> None:
        case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        case.call_and_validate(headers=headers, checks=CHECKS, timeout=60)

    try:
        check()
    except hypothesis.errors.Unsatisfiable:
        return None  # nothing to make invalid (GET /health takes no input): no negative case exists
    except (Exception, BaseExceptionGroup) as error:  # every operation runs; the test reports them all
        return str(error)
    return None
