"""Test-only registrations through the registries' public API, removed again when the block ends,
so a test's model or backend never outlives the tests that use it."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import pytest
from torch import nn

from image_classification.data import registry as data_registry
from image_classification.models import registry as model_registry


@contextmanager
def registered_model(spec: model_registry.ModelSpec) -> Iterator[model_registry.ModelSpec]:
    model_registry.register(spec)
    try:
        yield spec
    finally:
        model_registry.unregister(spec.name)


@contextmanager
def registered_backend(name: str, factory: Callable[[], data_registry.Backend]) -> Iterator[str]:
    data_registry.register(name, factory)
    try:
        yield name
    finally:
        data_registry.unregister(name)


def model_for_module(name: str, builder: Callable[..., nn.Module], default_image_size: int = 16):
    """An autouse fixture that registers a test-only architecture while one test module runs:
    ``_registered = model_for_module("tiny-cnn", tiny_cnn)`` at the module's top level."""
    @pytest.fixture(scope="module", autouse=True)
    def registered() -> Iterator[None]:
        with registered_model(model_registry.ModelSpec(name, "test", builder,
                                                       default_image_size=default_image_size)):
            yield
    return registered
