"""POST /v1/plan on a running gateway: the seed scenario, a model given by its config.json, a custom GPU, and the
errors of bad input (unknown names, malformed JSON, unknown fields: 422 with what to use instead; no key: 401)."""

from __future__ import annotations

import httpx

from baton.planner.catalog import MODEL_CONFIGS
from baton.planner.scenario import seed_scenario
from tests.fixtures.gateway import GatewayHandle

TENANT = "planner"


def _post(gateway: GatewayHandle, body: object, *, raw: bytes | None = None, auth: bool = True) -> httpx.Response:
    headers = gateway.headers(TENANT) if auth else {}
    if raw is not None:
        return httpx.post(
            f"{gateway.url}/v1/plan", content=raw, headers={**headers, "content-type": "application/json"}
        )
    return httpx.post(f"{gateway.url}/v1/plan", json=body, headers=headers, timeout=30)


def test_the_seed_scenario_over_http_equals_the_library(gateway_service: GatewayHandle) -> None:
    answer = _post(gateway_service, {"scenario": "seed"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == seed_scenario().model_dump(mode="json")


def test_a_model_config_inline_and_a_custom_gpu(gateway_service: GatewayHandle) -> None:
    body = {
        "config": MODEL_CONFIGS["qwen3-14b"],
        "custom_gpu": {"name": "my card", "memory_bytes": 32 << 30, "bandwidth_gb_s": 900, "bf16_tflops": 150},
        "training": {"method": "qlora", "seq_len": 4096, "dataset_tokens": 1_000_000},
    }
    answer = _post(gateway_service, body)
    assert answer.status_code == 200, answer.text
    (plan,) = answer.json()["plans"]
    assert plan["job"] == "training" and plan["gpu"]["name"] == "my card"
    assert plan["facts"]["total_params"] > 14e9 and plan["verdict"]["status"] in ("fits", "fits_if")
    assert plan["time"]["seconds"] > 0 and plan["lease"]["kind"] == "TRAINING"


def test_bad_input_gets_a_clear_4xx(gateway_service: GatewayHandle) -> None:
    unknown_model = _post(gateway_service, {"model": "gpt-5"})
    assert unknown_model.status_code == 422 and "qwen3-8b" in unknown_model.text
    unknown_gpu = _post(gateway_service, {"gpu": "voodoo-2", "serving": {}})
    assert unknown_gpu.status_code == 422 and "rtx-4090" in unknown_gpu.text
    bad_config = _post(gateway_service, {"config": {"num_hidden_layers": 2}, "training": {}})
    assert bad_config.status_code == 422 and "hidden_size" in bad_config.text
    for body in ({"training": {"rank": 0}}, {"surprise": 1}, {"scenario": "nope"}, {"rag": {"pages": -1}}):
        answer = _post(gateway_service, body)
        assert answer.status_code == 422, (body, answer.text)
        assert answer.headers["content-type"].startswith("application/json")
    assert _post(gateway_service, None, raw=b"{not json").status_code == 422
    assert _post(gateway_service, {"scenario": "seed"}, auth=False).status_code == 401
