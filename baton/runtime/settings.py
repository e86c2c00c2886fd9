"""Typed settings: one class per service, read from the environment (with the service's prefix) and from flags.

Precedence: command-line flag > environment variable > default. Every field has a description, which becomes
the flag's ``--help`` text and the README's settings table (``baton settings``).
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

from pydantic import BeforeValidator, Field, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


# A list setting written as "a,b,c" in the environment or a flag (not as JSON).
CommaList = Annotated[list[str], NoDecode, BeforeValidator(_split_commas)]


def _default_home() -> Path:
    # BATON_HOME is shared by every service (one catalogue, one adapter registry), so it is read without prefix.
    return Path(os.environ.get("BATON_HOME", "var"))


class CommonSettings(BaseSettings):
    """Settings every baton process has. Subclasses set ``model_config = service_config("NAME")``."""

    model_config = SettingsConfigDict(env_prefix="BATON_", extra="ignore")

    home: Path = Field(default_factory=_default_home, description="State directory (BATON_HOME is shared).")
    host: str = Field("127.0.0.1", description="Address the server binds to.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    log_format: Literal["text", "json"] = Field("text", description="text for people, json for log shippers.")
    shutdown_grace_s: float = Field(5.0, ge=0, description="Seconds in-flight calls get on SIGTERM.")


class ServiceSettings(CommonSettings):
    """Settings every gRPC service has."""

    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port (0 disables it).")


class LeaseSettings(ServiceSettings):
    """Settings of a service that may hold a GPU lease (``gpu_lease`` and ``scheduler_addr`` are declared by each
    service with its own wording); this only checks that they agree."""

    @model_validator(mode="after")
    def _lease_needs_a_scheduler(self) -> LeaseSettings:
        if getattr(self, "gpu_lease", "never") != "never" and not getattr(self, "scheduler_addr", ""):
            raise ValueError("gpu_lease needs scheduler_addr (or set gpu_lease=never)")
        return self


def service_config(name: str) -> SettingsConfigDict:
    """The pydantic-settings config for service ``name``: env variables BATON_<NAME>_<FIELD>."""
    return SettingsConfigDict(env_prefix=f"BATON_{name.upper()}_", extra="ignore")


S = TypeVar("S", bound=BaseSettings)


def env_name(cls: type[BaseSettings], field: str) -> str:
    return f"{cls.model_config.get('env_prefix', '')}{field}".upper()


def settings_from_args(cls: type[S], argv: list[str] | None, *, prog: str, description: str) -> S:
    """Build settings from flags (``--grpc-port 7000``) layered over the environment; ``--help`` lists them all."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every flag can also be set by the environment variable named in its help.",
    )
    for name, info in cls.model_fields.items():
        _add_flag(parser, cls, name, info)
    parsed = parser.parse_args(argv)
    overrides = {name: value for name, value in vars(parsed).items() if value is not None}
    return cls(**overrides)


def _add_flag(parser: argparse.ArgumentParser, cls: type[BaseSettings], name: str, info: FieldInfo) -> None:
    flag = "--" + name.replace("_", "-")
    default = info.get_default(call_default_factory=True)
    help_text = f"{info.description or ''} [env {env_name(cls, name)}; default {default}]"
    annotation = info.annotation
    if annotation is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        return
    choices = _literal_choices(annotation)
    parser.add_argument(flag, default=None, choices=choices, type=_scalar_type(annotation), help=help_text)


def _literal_choices(annotation: Any) -> list[Any] | None:
    return list(get_args(annotation)) if get_origin(annotation) is Literal else None


def _scalar_type(annotation: Any) -> Any:
    if get_origin(annotation) in (typing.Union, types.UnionType):
        non_none = [arg for arg in get_args(annotation) if arg is not type(None)]
        annotation = non_none[0] if len(non_none) == 1 else str
    if annotation in (int, float, str, Path):
        return annotation
    return str


def settings_table(cls: type[BaseSettings]) -> str:
    """A markdown table of every setting: environment variable, default, meaning (for the README)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, info in cls.model_fields.items():
        default = info.get_default(call_default_factory=False)
        if default is None or callable(default) or info.default_factory is not None:
            default = "(see meaning)" if name != "home" else "`var`"
        else:
            default = f"`{default}`"
        variable = "BATON_HOME" if name == "home" else env_name(cls, name)
        lines.append(f"| `{variable}` | {default} | {info.description or ''} |")
    return "\n".join(lines)
