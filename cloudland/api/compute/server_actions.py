"""POST /servers/{id}/action: power actions change desired state; console output asks the host."""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import Request
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from cloudland.api.errors import ApiError, bad_request, conflict
from cloudland.bus import subjects
from cloudland.bus.messages import ConsoleOutput, GetConsoleOutput, decode, encode
from cloudland.db.models import Instance

CONSOLE_TIMEOUT = 10.0
_HARD_REBOOT_STATES = ("active", "stopped", "paused", "suspended", "error")


def invalid_state(inst: Instance, action: str, attr: str = "vm_state") -> ApiError:
    value = inst.vm_state if attr == "vm_state" else inst.task_state
    return conflict(f"Cannot '{action}' instance {inst.id} while it is in {attr} {value}")


def _require_idle(inst: Instance, action: str) -> None:
    if inst.task_state is not None:
        raise invalid_state(inst, action, "task_state")


def start(inst: Instance) -> None:
    if inst.vm_state != "stopped":
        raise invalid_state(inst, "start")
    _require_idle(inst, "start")
    inst.desired_power = "running"
    inst.task_state = "powering-on"


def stop(inst: Instance) -> None:
    if inst.vm_state != "active":
        raise invalid_state(inst, "stop")
    _require_idle(inst, "stop")
    inst.desired_power = "stopped"
    inst.task_state = "powering-off"


def reboot(inst: Instance, args: Any) -> None:
    kind = args.get("type") if isinstance(args, dict) else None
    if not isinstance(kind, str) or kind.upper() not in ("SOFT", "HARD"):
        raise bad_request("Argument 'type' for reboot must be a string with value 'SOFT' or 'HARD'.")
    if kind.upper() == "SOFT":
        if inst.vm_state != "active":
            raise invalid_state(inst, "reboot")
        if inst.task_state not in (None, "rebooting"):
            raise invalid_state(inst, "reboot", "task_state")
        inst.task_state = "rebooting"
    else:
        if inst.vm_state not in _HARD_REBOOT_STATES or inst.host is None:
            raise invalid_state(inst, "reboot")
        if inst.task_state not in (None, "rebooting"):
            raise invalid_state(inst, "reboot", "task_state")
        inst.task_state = "rebooting_hard"
        inst.desired_power = "running"
    inst.reboot_generation += 1


def _console_length(args: Any) -> int | None:
    length = args.get("length") if isinstance(args, dict) else None
    if length is None:
        return None
    try:
        value = int(length)
    except (TypeError, ValueError):
        raise bad_request(f"Invalid input for field/attribute length. Value: {length}.")
    if value < -1 or isinstance(length, bool) or isinstance(length, float):
        raise bad_request(f"Invalid input for field/attribute length. Value: {length}.")
    return None if value == -1 else value


async def console_output(request: Request, inst: Instance, args: Any) -> dict[str, str]:
    length = _console_length(args)
    if not inst.host or inst.vm_state == "building":
        raise conflict(f"Instance {inst.id} is not ready")
    bus = request.app.state.bus
    if bus is None or not bus.is_connected:
        raise ApiError(503, "The message bus is not available.")
    message = encode(GetConsoleOutput(instance_id=inst.id, length=length))
    try:
        reply = await bus.request(subjects.host_rpc(inst.host), message, timeout=CONSOLE_TIMEOUT)
        answer = decode(reply.data)
    except (NatsTimeout, NoRespondersError):
        raise conflict(f"Console output of instance {inst.id} is not available: "
                       f"host {inst.host} is not responding.")
    except msgspec.DecodeError:
        raise ApiError(503, f"Host {inst.host} sent an invalid reply.")
    if not isinstance(answer, ConsoleOutput) or not answer.found:
        raise conflict(f"Instance {inst.id} is not ready")
    return {"output": answer.output}


def run_action(inst: Instance, payload: Any) -> None:
    """Apply one power action to the row inside the caller's transaction."""
    if not isinstance(payload, dict) or len(payload) != 1:
        raise bad_request("Malformed request body: exactly one action is required.")
    (action, args), = payload.items()
    if action == "os-start":
        start(inst)
    elif action == "os-stop":
        stop(inst)
    elif action == "reboot":
        reboot(inst, args)
    elif action == "os-getVNCConsole":
        raise bad_request("VNC consoles are not supported yet.")
    else:
        raise bad_request(f"There is no such action: {action}")
