"""The one boundary between gRPC and the domain: every CRI call passes through `rpc`,
which logs it once (with the sandbox, container or image it names) and maps a
ShimError to its status code, anything else to INTERNAL. The handlers of each
service are built from the proto descriptor, so that a method pyshim does not
implement answers UNIMPLEMENTED with its name, and a request that cannot be
decoded is INVALID_ARGUMENT, not INTERNAL.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from shim import memory, metrics
from shim._proto import api_pb2
from shim.errors import InvalidArgument, ShimError, Unimplemented

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 2000  # of an error's message: at most 6 KB once percent-encoded

# Polled every second or so by kubelet: logged at debug level only.
_QUIET = {
    "Version",
    "Status",
    "ListPodSandbox",
    "PodSandboxStatus",
    "ListContainers",
    "ImageFsInfo",
    "ListImages",
    "ListContainerStats",
    "ContainerStatus",
}

F = TypeVar("F", bound=Callable[..., Any])


def rpc(method: F) -> F:
    """Log the call once with its outcome; map errors to gRPC status codes."""
    name = method.__name__
    level = logging.DEBUG if name in _QUIET else logging.INFO
    # Methods are defined on RuntimeService/ImageService, whose names are the services'.
    calls = metrics.CallMetrics(method.__qualname__.partition(".")[0], name)

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        try:
            response = method(self, _decoded(name, request), context)
        except ShimError as exc:
            calls.done(exc.code.name, time.perf_counter() - start)  # before abort, which raises
            _abort(name, start, exc, context, _subject(request, None))
        except Exception:
            calls.done("INTERNAL", time.perf_counter() - start)
            _internal(name, start, context, _subject(request, None))
        calls.done("OK", time.perf_counter() - start)
        if log.isEnabledFor(level):
            log.log(level, "rpc=%s code=OK ms=%.2f%s", name, _ms(start), _subject(request, response))
        return response

    return wrapper  # type: ignore[return-value]


def rpc_stream(method: F) -> F:
    """`rpc` for a server-streaming method: `method` does its checks and returns the
    responses' iterator; an error raised then, or while the stream runs, is mapped
    as `rpc` maps it. Its opening (counted in the call metrics) and its end are logged."""
    name = method.__name__
    calls = metrics.CallMetrics(method.__qualname__.partition(".")[0], name)

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        try:
            responses = method(self, _decoded(name, request), context)
        except ShimError as exc:
            calls.done(exc.code.name, time.perf_counter() - start)
            _abort(name, start, exc, context)
        except Exception:
            calls.done("INTERNAL", time.perf_counter() - start)
            _internal(name, start, context)
        calls.done("OK", time.perf_counter() - start)
        log.info("rpc=%s code=OK ms=%.2f stream=open", name, _ms(start))
        return _streamed(name, responses, context)

    return wrapper  # type: ignore[return-value]


def _decoded(name: str, request: Any) -> Any:
    if isinstance(request, Undecodable):
        raise InvalidArgument(f"{name}: the request is not a valid {request.type_name}: {request.reason}")
    return request


def _streamed(name: str, responses: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
    start = time.perf_counter()
    try:
        yield from responses
    except GeneratorExit:  # gRPC closes the stream: its client went away mid-send
        log.info("rpc=%s code=CANCELLED ms=%.2f stream=closed", name, _ms(start))
        raise
    except ShimError as exc:
        _abort(name, start, exc, context, " stream=closed")
    except Exception:
        _internal(name, start, context, " stream=closed")
    log.info("rpc=%s code=OK ms=%.2f stream=closed", name, _ms(start))


def _abort(name: str, start: float, exc: ShimError, context: grpc.ServicerContext, subject: str = "") -> None:
    message = bounded(str(exc))
    log.warning("rpc=%s code=%s ms=%.2f%s error=%r", name, exc.code.name, _ms(start), subject, message)
    context.abort(exc.code, message)


def _internal(name: str, start: float, context: grpc.ServicerContext, subject: str = "") -> None:
    log.exception("rpc=%s code=INTERNAL ms=%.2f%s", name, _ms(start), subject)
    context.abort(grpc.StatusCode.INTERNAL, f"{name}: internal error in pyshim (details in its log)")


def bounded(message: str) -> str:
    """A status message short enough for its header: gRPC percent-encodes every byte
    outside printable ASCII (3 bytes each) and clients refuse headers over 8-16 KiB,
    so a message echoing a huge request field would reach the client as
    RESOURCE_EXHAUSTED instead of its own code."""
    raw = message.encode()
    if len(raw) <= MAX_MESSAGE_BYTES:
        return message
    return raw[:MAX_MESSAGE_BYTES].decode(errors="ignore") + " [...]"


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


# Request (and reply) fields that name what a call is about, and how the log calls them.
_SUBJECTS = (("pod_sandbox_id", "sandbox"), ("container_id", "container"))


def _subject(request: Any, response: Any) -> str:
    """ " sandbox=ID container=ID image=REF" for the log line, from what the call names."""
    parts = []
    for message in (request, response):
        for field_name, label in _SUBJECTS:
            value = getattr(message, field_name, "")
            if value and isinstance(value, str):
                parts.append(f" {label}={_loggable(value)}")
    image = getattr(request, "image", None)
    if image is not None and not isinstance(image, str):
        ref = getattr(image, "image", "")
        if ref:
            parts.append(f" image={_loggable(ref)}")
    image_ref = getattr(response, "image_ref", "")
    if image_ref:
        parts.append(f" image_id={_loggable(image_ref)}")
    return "".join(dict.fromkeys(parts))


def _loggable(value: str) -> str:
    # Ids and references are plain words; anything else from a request is shown quoted and cut.
    if len(value) <= 256 and value.isprintable() and " " not in value:
        return value
    return repr(value[:80])


@dataclasses.dataclass(frozen=True, slots=True)
class Undecodable:
    """A request that could not be decoded: answered INVALID_ARGUMENT, not INTERNAL."""

    type_name: str
    reason: str


def _unimplemented(service: str, method: str) -> Callable[..., Any]:
    def handler(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        raise Unimplemented(f"{service}/{method} is not implemented by pyshim yet")

    handler.__name__ = method
    handler.__qualname__ = f"{service}.{method}"  # rpc labels its metrics with the service
    return rpc(handler)


def _serialize(message: Message | bytes) -> bytes:
    # Responses encoded ahead (ListPodSandbox, from cached entries) go out as they are.
    return message if isinstance(message, bytes) else message.SerializeToString()


def _deserializer(message_type: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    parse = message_type.FromString

    def deserialize(data: bytes) -> Message | Undecodable:
        memory.note_request(len(data))
        try:
            return parse(data)
        except DecodeError as exc:  # e.g. a string field that is not UTF-8
            return Undecodable(message_type.DESCRIPTOR.full_name, str(exc)[:200])

    return deserialize


def generic_handler(servicer: object, service: str) -> grpc.GenericRpcHandler:
    """Handlers for every method of a CRI service, built from the proto descriptor."""
    handlers = {}
    for method in api_pb2.DESCRIPTOR.services_by_name[service].methods:
        factory = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=_deserializer(getattr(api_pb2, method.input_type.name)),
            response_serializer=_serialize,
        )
    return grpc.method_handlers_generic_handler(f"runtime.v1.{service}", handlers)


def fill_unimplemented(cls: type, service: str) -> type:
    """Every method of the service that `cls` does not define answers UNIMPLEMENTED by name."""
    descriptor = api_pb2.DESCRIPTOR.services_by_name[service]
    for method in descriptor.methods:
        if method.name not in cls.__dict__:
            setattr(cls, method.name, _unimplemented(service, method.name))
    return cls
