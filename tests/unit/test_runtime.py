"""The shared runtime: settings precedence and flags, the error taxonomy across gRPC and HTTP, logging."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import grpc
import pytest

from baton.runtime import errors
from baton.runtime.logging import configure_logging, log_event
from baton.runtime.settings import settings_from_args
from services.scheduler.settings import SchedulerSettings


def test_settings_flags_override_env_which_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATON_SCHEDULER_TTL_S", "7")
    monkeypatch.setenv("BATON_SCHEDULER_YIELD_DEADLINE_S", "9")
    monkeypatch.setenv("BATON_HOME", "/tmp/baton-home")
    settings = settings_from_args(SchedulerSettings, ["--ttl-s", "3", "--no-use-nvml"], prog="x", description="")
    assert settings.ttl_s == 3  # flag beats env
    assert settings.yield_deadline_s == 9  # env beats default
    assert settings.ageing_s == 60  # default
    assert settings.use_nvml is False
    assert settings.resolved_state_path() == Path("/tmp/baton-home/scheduler.sqlite")


def test_settings_refuse_nonsense_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        settings_from_args(SchedulerSettings, ["--ttl-s", "-1"], prog="x", description="")


def test_help_lists_every_setting_with_its_env_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        settings_from_args(SchedulerSettings, ["--help"], prog="baton serve scheduler", description="")
    text = capsys.readouterr().out
    for name in SchedulerSettings.model_fields:
        assert "--" + name.replace("_", "-") in text
    assert "BATON_SCHEDULER_TTL_S" in text


@pytest.mark.parametrize(
    ("cls", "code", "http"),
    [
        (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, 422),
        (errors.EmptyInput, grpc.StatusCode.INVALID_ARGUMENT, 400),
        (errors.PayloadTooLarge, grpc.StatusCode.INVALID_ARGUMENT, 413),
        (errors.NotFound, grpc.StatusCode.NOT_FOUND, 404),
        (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS, 409),
        (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION, 409),
        (errors.UpstreamFailed, grpc.StatusCode.FAILED_PRECONDITION, 424),
        (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (errors.Unavailable, grpc.StatusCode.UNAVAILABLE, 503),
        (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, 401),
    ],
)
def test_each_error_has_one_grpc_code_and_one_http_status(cls: type[errors.BatonError], code, http) -> None:
    assert cls.grpc_code == code and cls.http_status == http
    # The way back from the wire picks the same class from the code and the ErrorInfo reason.
    assert errors.error_class_for(code, cls.default_reason) is cls


def test_unknown_reason_falls_back_to_the_base_class_of_the_code() -> None:
    assert errors.error_class_for(grpc.StatusCode.FAILED_PRECONDITION, "SOMETHING_NEW") is errors.FailedPrecondition
    assert errors.error_class_for(grpc.StatusCode.INVALID_ARGUMENT, None) is errors.InvalidArgument
    assert errors.error_class_for(grpc.StatusCode.DATA_LOSS, None) is errors.Internal


def test_status_carries_reason_metadata_and_retry_hint() -> None:
    error = errors.ResourceExhausted("busy", reason="GPU_BUSY", metadata={"position": "2"}, retry_after_s=12.5)
    status = errors.to_grpc_status(error)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert error.to_json() == {
        "error": "busy",
        "error_type": "overloaded",
        "reason": "GPU_BUSY",
        "details": {"position": "2"},
        "retry_after_s": 12.5,
    }
    assert len(status.details) == 2  # ErrorInfo + RetryInfo


def test_json_logs_are_one_object_per_line_with_fields(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("test", level="INFO", fmt="json")
    log_event(logging.getLogger("t"), "lease.granted", holder="a", epoch=3)
    record = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert record["event"] == "lease.granted" and record["holder"] == "a" and record["epoch"] == 3
    assert record["service"] == "test"


@pytest.mark.parametrize(
    "settings_class",
    [
        "services.scheduler.settings:SchedulerSettings",
        "services.embedder.settings:EmbedderSettings",
        "services.inference.settings:InferenceSettings",
        "services.trainer.settings:TrainerSettings",
        "services.gateway.settings:GatewaySettings",
    ],
)
def test_the_settings_reference_lists_every_setting(settings_class: str) -> None:
    from importlib import import_module

    from baton.runtime.settings import env_name

    module, name = settings_class.split(":")
    cls = getattr(import_module(module), name)
    reference = (Path(__file__).resolve().parents[2] / "docs" / "settings.md").read_text()  # `make docs` writes it
    for field in cls.model_fields:
        if field == "home":
            continue  # documented as BATON_HOME, shared by every service
        assert env_name(cls, field) in reference, field


def test_free_port_in_a_range_picks_each_free_port_once_and_skips_a_taken_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """BATON_PORT_RANGE (parallel test workers each get one): ports come from it, never twice, and never one that is
    bound already; a spent range says so."""
    import socket

    from baton.runtime import process

    monkeypatch.setattr(process, "_handed_out", set())
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        # Below the test workers' ranges (tests/conftest.py) and the kernel's own: nothing else binds there.
        busy = 11_000 + random.randrange(900)
        taken.bind(("127.0.0.1", busy))
        span = range(busy - 2, busy + 3)
        monkeypatch.setenv(process.PORT_RANGE_ENV, f"{span[0]}-{span[-1]}")
        picked = [process.free_port() for _ in range(4)]
        assert sorted(picked) == [port for port in span if port != busy]
        with pytest.raises(RuntimeError, match=f"no free port left in {process.PORT_RANGE_ENV}"):
            process.free_port()
    monkeypatch.delenv(process.PORT_RANGE_ENV)
    assert process.free_port() > 0  # the kernel's choice again
