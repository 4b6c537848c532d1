"""Name → model builder registry.

Every architecture registers a :class:`ModelSpec` (:mod:`.spec`, which the family modules
import). The command line validates ``--arch`` and the model flags against the spec, so a flag
that does not apply to a family (``--fused_se`` for an EfficientNet) is a clear error instead of
being silently ignored.
"""
from __future__ import annotations

from image_classification.errors import UserError
from image_classification.models.spec import (_REGISTRY, _UNAVAILABLE, ModelSpec, register,  # noqa: F401 (the public API)
                                              register_unavailable, unregister)


def _ensure_loaded() -> None:
    # Importing the family modules registers their architectures.
    from image_classification.models import efficientnet, resnet  # noqa: F401


def names() -> list[str]:
    _ensure_loaded()
    return list(_REGISTRY)


def get(name: str) -> ModelSpec:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        if name in _UNAVAILABLE:
            raise UserError(f"--arch {name}: {_UNAVAILABLE[name]}") from None
        raise UserError(f"unknown --arch {name!r}; choose one of: {', '.join(_REGISTRY)}") from None
