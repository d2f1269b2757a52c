"""``cluster.servicer.status_for``: the gRPC status from the type of the cause under Ray's and Serve's
wrappers, on real exception objects (no Ray started), never from the text."""

from __future__ import annotations

import pickle

import grpc
import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    gRPCStatusError,
)

from cluster.servicer import status_for, unwrap_cause
from engine.block_pool import OutOfBlocksError
from worker_common.messages import NoKVSpaceError


def ray_task_error(cause: BaseException, function_name: str = "DecodeDeployment.generate") -> RayTaskError:
    """The ``RayTaskError`` Ray builds in the callee when a remote method raises ``cause``."""
    traceback_str = f"Traceback (most recent call last):\n  ...\n{type(cause).__name__}: {cause}"
    return RayTaskError(function_name, traceback_str, cause, proctitle="ray::Replica", pid=1, ip="10.0.0.9")


def as_ray_raises(cause: BaseException) -> BaseException:
    """What the caller of a remote method that raised ``cause`` catches: the ``RayTaskError`` pickled to the
    caller and re-raised there as an instance of the cause's class too."""
    return pickle.loads(pickle.dumps(ray_task_error(cause))).as_instanceof_cause()


def test_a_ray_task_error_wrapping_no_kv_space_is_resource_exhausted() -> None:
    error = as_ray_raises(NoKVSpaceError("decode replica d1: no room for 9 KV blocks"))
    assert isinstance(error, RayTaskError)
    cause = unwrap_cause(error)
    assert isinstance(cause, NoKVSpaceError) and not isinstance(cause, RayTaskError)
    code, message = status_for(error)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert message == "NoKVSpaceError: decode replica d1: no room for 9 KV blocks"  # one line, no traceback


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (NoKVSpaceError("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (OutOfBlocksError("asked for 3 blocks, 1 allocatable"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (BackPressureError(num_queued_requests=8, max_queued_requests=8), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ActorDiedError(), grpc.StatusCode.UNAVAILABLE),
        (ActorUnavailableError("connection lost", None), grpc.StatusCode.UNAVAILABLE),
        (RayActorError(), grpc.StatusCode.UNAVAILABLE),
        (ReplicaUnavailableError("r1"), grpc.StatusCode.UNAVAILABLE),
        (DeploymentUnavailableError(DeploymentID(name="DecodeDeployment", app_name="pdserve")),
         grpc.StatusCode.UNAVAILABLE),
        (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
        (RuntimeError("engine step failed: boom"), grpc.StatusCode.INTERNAL),
        (ValueError("bad"), grpc.StatusCode.INTERNAL),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else value.name,
)
def test_status_by_type_bare_and_wrapped(error: BaseException, code: grpc.StatusCode) -> None:
    assert status_for(error)[0] == code
    assert status_for(as_ray_raises(error))[0] == code  # the same cause raised in a replica
    assert status_for(gRPCStatusError(as_ray_raises(error)))[0] == code  # Serve's gRPC wrapper too


def test_nested_wrappers_unwrap_to_the_innermost_cause() -> None:
    inner = ray_task_error(NoKVSpaceError("full"), "DecodeDeployment.generate")
    outer = ray_task_error(inner, "IngressDeployment.generate")  # a remote call made inside a remote call
    outer = pickle.loads(pickle.dumps(outer)).as_instanceof_cause()
    assert isinstance(unwrap_cause(outer), NoKVSpaceError)
    assert status_for(outer)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_text_does_not_decide() -> None:
    assert status_for(RuntimeError("NoKVSpaceError: ActorDiedError"))[0] == grpc.StatusCode.INTERNAL
    assert status_for(as_ray_raises(ValueError("ReplicaUnavailableError")))[0] == grpc.StatusCode.INTERNAL


def test_deadline_message_and_multi_line_causes_stay_one_line() -> None:
    assert status_for(TimeoutError()) == (grpc.StatusCode.DEADLINE_EXCEEDED, "request_timeout_s passed")
    code, message = status_for(as_ray_raises(ActorDiedError()))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "\n" not in message and message.startswith("ActorDiedError")
