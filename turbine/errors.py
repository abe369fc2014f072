"""One error tree for the whole project.

Every error carries the HTTP status and gRPC status-code name an edge should answer with, and the
OpenAI error `type`, so edges translate errors mechanically and never invent a 500 for bad input.
"""

from __future__ import annotations

from typing import ClassVar


class TurbineError(Exception):
    http_status: ClassVar[int] = 500
    grpc_code: ClassVar[str] = "INTERNAL"
    error_type: ClassVar[str] = "internal_error"
    # Whether the same request may succeed if sent again (to another worker, or later).
    retriable: ClassVar[bool] = False

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_openai(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class ConfigError(TurbineError):
    """Invalid start-up configuration (flags, env, model files). Raised before serving."""

    error_type = "config_error"


class InvalidRequest(TurbineError):
    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    error_type = "invalid_request_error"


class ModelNotFound(InvalidRequest):
    http_status = 404
    grpc_code = "NOT_FOUND"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist.", param="model", code="model_not_found")


class NotFound(InvalidRequest):
    http_status = 404
    grpc_code = "NOT_FOUND"


class MethodNotAllowed(InvalidRequest):
    http_status = 405
    grpc_code = "UNIMPLEMENTED"


class PayloadTooLarge(InvalidRequest):
    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class ServiceUnavailable(TurbineError):
    """No live worker can take the request now (none registered, all busy, all unreachable)."""

    http_status = 503
    grpc_code = "UNAVAILABLE"
    error_type = "service_unavailable"
    retriable = True


class WorkerUnreachable(ServiceUnavailable):
    """The request plane could not reach a worker, or the connection broke mid-stream."""


class WorkerStalled(WorkerUnreachable):
    """A worker's connection or stream stayed silent past `--request-stall-timeout-s` (frozen,
    hung or partitioned); its streams move like a broken connection's and routing avoids it until
    it answers again."""


class WorkerDraining(ServiceUnavailable):
    """The worker is shutting down and refused a new request; another worker may take it."""


class UpstreamUnavailable(WorkerDraining):
    """The server behind an upstream sidecar worker refused or dropped a request. It travels like a
    draining refusal: retriable, and the frontend skips that worker for a moment."""


class EngineError(TurbineError):
    """The engine failed the request (reported by the worker)."""

    http_status = 500
    error_type = "engine_error"
