"""Domain errors, each carrying the gRPC status code it maps to.

This is the one module that knows about gRPC codes; the server maps a
ShimError to its code and anything else to INTERNAL.
"""

from __future__ import annotations

from typing import ClassVar

import grpc


class ShimError(Exception):
    """A request failed for a reason the client should see."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN


class InvalidArgument(ShimError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ShimError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ShimError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ShimError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ShimError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ShimError):
    """A time limit the request set ran out (an ExecSync timeout)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(ShimError):
    """A node-wide limit is reached (addresses, bridge ports)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Aborted(ShimError):
    code = grpc.StatusCode.ABORTED


class SubscriberDropped(Aborted):
    """An event stream fell too far behind and was dropped: the client relists and
    subscribes again."""


class Unimplemented(ShimError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(ShimError):
    code = grpc.StatusCode.UNAUTHENTICATED


class DataLoss(ShimError):
    """Content did not match its digest."""

    code = grpc.StatusCode.DATA_LOSS


class Internal(ShimError):
    """A kernel or system operation failed; the message says which and why."""

    code = grpc.StatusCode.INTERNAL


class NetlinkRefused(Internal):
    """The kernel refused a netlink request; `errno` says why."""

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class InjectedFailure(Internal):
    """Raised at a named step when the daemon was started with --fail-at (tests only)."""
