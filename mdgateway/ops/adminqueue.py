# -*- test-case-name: tests.test_admin -*-
"""
The admin API's queue endpoints: the queue of every instance, one queued
message's content view, and the queue tools (hold, release the hold,
delete, bounce, retry, flush), wherever in the cluster the message is.

Each handler reads and checks the request, passes the operator's name on
to L{IOperations} (which finds the process and instance, and audits) and
writes the answer. An action that no longer applies (the message is
gone) is a 409; one the holding process or instance cannot be asked for
is a 503 (504 when it may still happen).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mdgateway.ops import adminjson
from mdgateway.ops.adminhttp import (
    ApiCall,
    ApiResponse,
    bad_parameter,
    only_fields,
    resolve,
)
from mdgateway.ops.interfaces import QueueAction

if TYPE_CHECKING:
    from mdgateway.ops.admin import AdminAPI

#: The longest instance name accepted.
MAX_INSTANCE = 200


def _instance(value: Any) -> str | None:
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or not value
        or len(value) > MAX_INSTANCE
        or not value.isprintable()
    ):
        raise bad_parameter("instance", "must be an instance's name")
    return value


async def listing(api: AdminAPI, call: ApiCall) -> ApiResponse:
    q = call.query(("instance",))
    result = await resolve(api.operations.cluster_queue(_instance(q.text("instance"))))
    return ApiResponse.json(200, adminjson.queue_listing(result))


async def show(api: AdminAPI, call: ApiCall) -> ApiResponse:
    (queue_id,) = call.args
    q = call.query(("instance",))
    message = await resolve(
        api.operations.queued_message(queue_id, _instance(q.text("instance")))
    )
    return ApiResponse.json(200, adminjson.queued_message(message))


async def _act(
    api: AdminAPI, call: ApiCall, action: str, *, bounce: bool = False
) -> ApiResponse:
    (queue_id,) = call.args
    body = call.body()
    only_fields(body, ("instance", "bounce") if action == "delete" else ("instance",))
    if action == "delete":
        asked = body.get("bounce", call.query(("bounce",)).boolean("bounce") or False)
        if not isinstance(asked, bool):
            raise bad_parameter("bounce", "must be true or false")
        bounce = asked
    result = await resolve(
        api.operations.queue_action(
            QueueAction(
                action=action,
                queue_id=queue_id,
                by=call.by,
                instance=_instance(body.get("instance")),
                bounce=bounce,
                origin=call.origin,
            )
        )
    )
    api.logged(
        call,
        f"queue {action}",
        queue_id,
        instance=result.instance,
        process=result.process,
        detail=result.detail,
    )
    status = 202 if result.later or action == "retry" else 200
    return ApiResponse.json(status, adminjson.queue_action(result))


async def hold(api: AdminAPI, call: ApiCall) -> ApiResponse:
    return await _act(api, call, "hold")


async def release_hold(api: AdminAPI, call: ApiCall) -> ApiResponse:
    return await _act(api, call, "release-hold")


async def retry(api: AdminAPI, call: ApiCall) -> ApiResponse:
    return await _act(api, call, "retry")


async def bounce(api: AdminAPI, call: ApiCall) -> ApiResponse:
    return await _act(api, call, "bounce")


async def delete(api: AdminAPI, call: ApiCall) -> ApiResponse:
    return await _act(api, call, "delete")


async def flush(api: AdminAPI, call: ApiCall) -> ApiResponse:
    body = call.body()
    only_fields(body, ("instance",))
    result = await resolve(
        api.operations.flush(call.by, _instance(body.get("instance")), call.origin)
    )
    api.logged(call, "queue flush", body.get("instance") or "all", tried=result.tried)
    return ApiResponse.json(202, {"tried": result.tried, "problems": result.problems})
