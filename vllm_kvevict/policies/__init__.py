"""Eviction policies: one module per method, registered by name.

``get_policy(name, options)`` builds a policy with validated options; unknown names or bad
options raise ``ValueError`` naming the field and the valid choices.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from pydantic import ValidationError

from vllm_kvevict.policies.base import REGISTRY, EvictionPolicy

#: modules of this package that hold shared code, not a method
SHARED_MODULES = frozenset({"base", "common", "scorer", "selection"})

# Every other module is one method that registers itself on import (``@register_policy``): a
# new policy is its file, found here without a list to keep.
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in SHARED_MODULES and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

NONE = "none"


def available_policies() -> list[str]:
    """Valid values of ``kv_eviction.policy`` (``none`` disables eviction)."""
    return [NONE, *sorted(REGISTRY.classes)]


def get_policy_class(name: str) -> type[EvictionPolicy]:
    if name not in REGISTRY.classes:
        raise ValueError(
            f"kv_eviction.policy: unknown policy {name!r}; valid policies: {available_policies()}"
        )
    return REGISTRY.classes[name]


def get_policy(name: str, options: dict[str, Any] | None = None) -> EvictionPolicy:
    cls = get_policy_class(name)
    try:
        config = cls.Config(**(options or {}))
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, prefix=f"kv_eviction.options ({name})")) from None
    return cls(config)


def format_validation_error(exc: ValidationError, prefix: str) -> str:
    """One line per bad field: ``prefix.field: message (got value)``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if loc:
            lines.append(f"{prefix}.{loc}: {msg} (got {err.get('input')!r})")
        else:
            lines.append(f"{prefix}: {msg}")
    return "; ".join(lines)


__all__ = ["available_policies", "get_policy", "get_policy_class", "format_validation_error"]
