"""``run_service``: what every ``python -m services.X`` does — settings, logging, then the heavy imports and the loop.

Order matters: flags and environment are parsed first (``--help`` answers without importing torch), logging is set
up before anything heavy is imported (STYLE.md 8), model services pin the hub offline before transformers loads,
and a configuration problem found while loading ends the process with its message, not a traceback.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from importlib import import_module
from typing import TypeVar

from pydantic import ValidationError

from baton.runtime.errors import BatonError
from baton.runtime.logging import configure_logging
from baton.runtime.settings import CommonSettings, settings_from_args

S = TypeVar("S", bound=CommonSettings)


def run_service(
    name: str,
    settings_class: type[S],
    argv: list[str] | None,
    *,
    description: str,
    serve: str,
    models: bool = False,
    prog: str | None = None,
) -> None:
    """Run service ``name``: ``serve`` is "module:function", an ``async def serve(settings)`` imported only now."""
    prog = prog or f"baton serve {name}"
    try:
        settings = settings_from_args(settings_class, argv, prog=prog, description=description)
    except ValidationError as error:
        sys.exit(f"{prog}: invalid settings:\n{error}")
    configure_logging(name, level=settings.log_level, fmt=settings.log_format)
    if models:  # before transformers is imported: no hub, ever
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    module, function = serve.split(":")
    serve_function: Callable[[S], Awaitable[None]] = getattr(import_module(module), function)
    try:
        asyncio.run(serve_function(settings))  # type: ignore[arg-type]
    except BatonError as error:
        sys.exit(f"{prog}: {error.message}")
