"""Pydantic's validation errors as one line a user can act on: each bad key by its config path, unknown
keys with the keys allowed there, and the union tags pydantic inserts (task families, schedule kinds) left out.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from learners.registry import DEFAULT_ALGORITHM, AlgorithmConfig, variants
from orchestrator.config.base import InvalidKey
from orchestrator.config.lr_schedule import SCHEDULE_KINDS
from orchestrator.config.task import TASK_FAMILIES


def _allowed_keys(model: type[BaseModel], loc: tuple, data: Any) -> list[str] | None:
    """Field names of the config section at ``loc`` (skipping union tags), for 'unknown key' messages;
    ``data`` is the input, which says which algorithm variant a section is."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            continue  # a discriminator tag such as 'sine' in ('task', 'sine', 'k_shot')
        data = data.get(part) if isinstance(data, dict) else None
        current = _model_in(field.annotation)
        if current is AlgorithmConfig and isinstance(data, dict):
            current = variants().get(data.get("name", DEFAULT_ALGORITHM))
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else None


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def explain(error: ValidationError, prefix: tuple, model: type[BaseModel], data: Any = None) -> str:
    parts: list[str] = []
    families = set(TASK_FAMILIES)
    for e in error.errors():
        loc = tuple(str(p) for p in e["loc"])
        # Drop the union tags pydantic inserts ('task', 'sine', 'k_shot'; 'schedule', 'step', ...): users never
        # write them.
        key_loc = tuple(p for i, p in enumerate(loc) if not (i and ((loc[i - 1] == "task" and p in families) or
                                                                    (loc[i - 1] == "schedule" and p in SCHEDULE_KINDS))))
        ctx_error = (e.get("ctx") or {}).get("error")
        if isinstance(ctx_error, InvalidKey):
            if ctx_error.key:
                key_loc = key_loc + (ctx_error.key,)
            message = str(ctx_error)
        elif e["type"] == "value_error":
            message = e["msg"].removeprefix("Value error, ")
        elif e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1], data)
            message = "unknown key" + (f" (allowed here: {', '.join(allowed)})" if allowed else "")
            if loc[:-1] == ("algorithm",):
                owners = sorted(n for n, m in variants().items() if loc[-1] in m.model_fields)
                message += f"; it is a setting of {', '.join(owners)}" if owners else ""
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found") and loc[-1:] == ("schedule",):
            key_loc = key_loc + ("kind",)
            given = e["input"].get("kind") if isinstance(e["input"], dict) else None
            message = (f"must be one of {', '.join(SCHEDULE_KINDS)}, got {given!r}" if given is not None
                       else f"is required: one of {', '.join(SCHEDULE_KINDS)}")
        elif e["type"] == "union_tag_invalid":
            key_loc = key_loc + ("family",)
            message = f"unknown task family {e['ctx']['tag']!r} (allowed: {', '.join(TASK_FAMILIES)})"
        elif e["type"] == "literal_error":
            message = f"{e['msg'].replace('Input should be', 'must be')}, got {e['input']!r}"
        else:
            message = f"{e['msg']}, got {e['input']!r}"
        key = ".".join(prefix + key_loc)
        parts.append(f"{key}: {message}" if key else message)
    return "; ".join(parts)
