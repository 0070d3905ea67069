"""Request errors with their gRPC status codes (shared by the manager and the handlers)."""
from __future__ import annotations

import grpc

# gRPC status by TF error code (tf.errors.OpError.error_code is the same enum's value).
GRPC_CODE = {c.value[0]: c for c in grpc.StatusCode}
TF_OK = 0


class ServingError(Exception):
    """A request error with its gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(msg):
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, msg)


def not_found(msg):
    return ServingError(grpc.StatusCode.NOT_FOUND, msg)
