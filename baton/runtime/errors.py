"""One error taxonomy for every service, mapped once per transport.

Cores raise these domain errors and know nothing of gRPC or HTTP. The gRPC servicers turn them into a status
code with rich details (``ErrorInfo`` with a machine-readable reason, ``RetryInfo`` for "come back later"); the
gRPC clients turn statuses back into the same classes (matching codes and reasons, never message strings); the
gateway maps them to HTTP. TEI and vLLM use the same split: validation 422 (400 for empty input), overloaded
429, not ready 503, upstream failed 424, unknown thing 404.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

log = logging.getLogger(__name__)

ERROR_DOMAIN = "baton"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class BatonError(Exception):
    """Base of every error a baton service reports on purpose.

    ``reason`` is a stable UPPER_SNAKE identifier for programs; ``message`` is for people and should say what to
    do next; ``metadata`` carries structured facts (queue position, ETA, limits); ``retry_after_s`` tells a
    client when trying again makes sense.
    """

    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    http_status: ClassVar[int] = 500
    error_type: ClassVar[str] = "internal"
    default_reason: ClassVar[str] = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        self.retry_after_s = retry_after_s

    def to_json(self) -> dict[str, Any]:
        """The HTTP body: TEI's ``{"error", "error_type"}`` plus the reason and facts."""
        body: dict[str, Any] = {"error": self.message, "error_type": self.error_type, "reason": self.reason}
        if self.metadata:
            body["details"] = self.metadata
        if self.retry_after_s is not None:
            body["retry_after_s"] = round(self.retry_after_s, 3)
        return body


class InvalidArgument(BatonError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 422
    error_type = "validation"
    default_reason = "INVALID_ARGUMENT"


class EmptyInput(InvalidArgument):
    http_status = 400
    error_type = "empty"
    default_reason = "EMPTY_INPUT"


class PayloadTooLarge(InvalidArgument):
    http_status = 413
    error_type = "payload_too_large"
    default_reason = "PAYLOAD_TOO_LARGE"


class Unauthenticated(BatonError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    error_type = "unauthenticated"
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(BatonError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403
    error_type = "permission_denied"
    default_reason = "PERMISSION_DENIED"


class NotFound(BatonError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    error_type = "not_found"
    default_reason = "NOT_FOUND"


class AlreadyExists(BatonError):
    grpc_code = grpc.StatusCode.ALREADY_EXISTS
    http_status = 409
    error_type = "conflict"
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(BatonError):
    """The request is valid but the system is not in a state to do it (a stale lease epoch, a job not running)."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409
    error_type = "failed_precondition"
    default_reason = "FAILED_PRECONDITION"


class UpstreamFailed(FailedPrecondition):
    """A neighbour (model backend, vector store) failed while doing our work."""

    http_status = 424
    error_type = "backend"
    default_reason = "UPSTREAM_FAILED"


class ResourceExhausted(BatonError):
    """Overloaded or queued past a limit; ``retry_after_s`` says when to come back."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    error_type = "overloaded"
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(BatonError):
    """Not ready yet (model loading, GPU lease held elsewhere, dependency down)."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    error_type = "unhealthy"
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(BatonError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504
    error_type = "timeout"
    default_reason = "DEADLINE_EXCEEDED"


class Cancelled(BatonError):
    grpc_code = grpc.StatusCode.CANCELLED
    http_status = 499
    error_type = "cancelled"
    default_reason = "CANCELLED"


class Internal(BatonError):
    pass


def _all_error_classes() -> list[type[BatonError]]:
    found: list[type[BatonError]] = []
    pending: list[type[BatonError]] = [BatonError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def error_class_for(code: grpc.StatusCode, reason: str | None) -> type[BatonError]:
    """The most specific class for a status code and (optional) ErrorInfo reason."""
    candidates = [cls for cls in _all_error_classes() if cls.grpc_code == code]
    for cls in candidates:
        if reason and cls.default_reason == reason:
            return cls
    # The base class for the code: the one whose parent has a different code.
    for cls in candidates:
        if all(base.grpc_code != code for base in cls.__mro__[1:] if issubclass(base, BatonError)):
            return cls
    return Internal


# ---------------------------------------------------------------------------------------------------- gRPC side


def to_grpc_status(error: BatonError) -> status_pb2.Status:
    """Encode a domain error as a google.rpc.Status with ErrorInfo (and RetryInfo when there is a hint)."""
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
    details = [_pack(info)]
    if error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status_pb2.Status(code=error.grpc_code.value[0], message=error.message, details=details)


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


async def abort_with_error(context: grpc.aio.ServicerContext, error: BatonError) -> None:
    status = to_grpc_status(error)
    await context.abort(
        error.grpc_code,
        error.message,
        trailing_metadata=((_STATUS_DETAILS_KEY, status.SerializeToString()),),
    )


def from_rpc_error(error: grpc.RpcError) -> BatonError:
    """Turn a gRPC failure seen by a client back into the domain error the server raised."""
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    message: str = error.details() or code.name  # type: ignore[attr-defined]
    reason: str | None = None
    metadata: dict[str, str] = {}
    retry_after_s: float | None = None
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key != _STATUS_DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
    cls = error_class_for(code, reason)
    return cls(message, reason=reason, metadata=metadata, retry_after_s=retry_after_s)


F = TypeVar("F", bound=Callable[..., Any])


def grpc_errors(method: F) -> F:
    """Decorate a servicer method (coroutine or async generator): domain errors become rich gRPC statuses.

    Anything that is not a BatonError is a bug: it is logged with its traceback and reported as INTERNAL
    without leaking internals to the caller.
    """
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except BatonError as error:
                await abort_with_error(context, error)
            except Exception as error:
                if _is_abort(error):
                    raise
                log.exception("unhandled error in %s", method.__qualname__)
                await abort_with_error(context, Internal("internal error; see the service log"))

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except BatonError as error:
            await abort_with_error(context, error)
        except Exception as error:
            if _is_abort(error):
                raise
            log.exception("unhandled error in %s", method.__qualname__)
            await abort_with_error(context, Internal("internal error; see the service log"))

    return unary_wrapper  # type: ignore[return-value]


def _is_abort(error: BaseException) -> bool:
    # context.abort() raises grpc.aio.AbortError, which must pass through untouched.
    return isinstance(error, grpc.aio.AbortError)
