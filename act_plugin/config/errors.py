"""The one error type of configurations, and one readable message for pydantic's errors."""

from __future__ import annotations

from pydantic import BaseModel, ValidationError

__all__ = ["ACTConfigError", "explain_validation"]


class ACTConfigError(ValueError):
    """A configuration that cannot be used, with a message naming the problem."""


def _model_at(model: type[BaseModel], path: tuple) -> type[BaseModel]:
    """The (nested) pydantic model that owns the keys at ``path`` (e.g. ``("fast",)``)."""
    for part in path:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field is not None else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            break
        model = ann
    return model


def explain_validation(e: ValidationError, model: type[BaseModel], kind: str) -> str:
    """One readable message for a config's validation errors: unknown keys with the keys
    allowed where they stand, missing keys, and our validators' own messages."""
    msgs = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            allowed = _model_at(model, tuple(err["loc"][:-1])).model_fields
            msgs.append(f"unknown key '{loc}' (allowed: {', '.join(allowed)})")
        elif err["type"] == "missing":
            msgs.append(f"missing required key '{loc}'")
        else:
            msgs.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
    return f"invalid {kind}: " + "; ".join(msgs)
