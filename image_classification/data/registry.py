"""``--data-backend`` names -> data backends (the contract they fulfil is :mod:`~image_classification.data.contract`).

Each built-in backend's module is imported only when that backend is chosen, so an optional
dependency (DALI) is imported only by the runs that use it; the backends themselves import only
the contract, never this module.
"""
from __future__ import annotations

from typing import Callable

from image_classification.data.contract import Backend
from image_classification.errors import UserError


def _pytorch() -> Backend:
    from image_classification.data.loaders import pytorch
    return pytorch.BACKEND


def _synthetic() -> Backend:
    from image_classification.data.loaders import synthetic
    return synthetic.BACKEND


def _dali_cpu() -> Backend:
    from image_classification.data.loaders import dali  # imports nvidia.dali only when it is called
    return dali.backend("cpu")


def _dali_gpu() -> Backend:
    from image_classification.data.loaders import dali
    return dali.backend("gpu")


_BACKENDS: dict[str, Callable[[], Backend]] = {"pytorch": _pytorch, "synthetic": _synthetic,
                                               "dali-cpu": _dali_cpu, "dali-gpu": _dali_gpu}


def register(name: str, factory: Callable[[], Backend]) -> None:
    """Register a backend lazily: ``factory`` runs only when the backend is chosen, so an optional
    dependency (DALI) is imported only by the runs that use it."""
    _BACKENDS[name] = factory


def unregister(name: str) -> None:
    """Remove the backend registered as ``name`` (a plugin's or a test's)."""
    del _BACKENDS[name]


def names() -> list[str]:
    return list(_BACKENDS)


def get(name: str) -> Backend:
    try:
        factory = _BACKENDS[name]
    except KeyError:
        raise UserError(f"unknown --data-backend {name!r}; choose one of: {', '.join(_BACKENDS)}") from None
    return factory()
