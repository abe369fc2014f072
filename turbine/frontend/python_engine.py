"""`--exp-python-factory module:function`: serve a model through a Python engine inside the frontend.

When a model is discovered the frontend calls `function(card)`; it returns an engine, an async
generator function over the preprocessed request (`PreprocessedRequest` → `EngineOutput` deltas,
the last one with a finish reason). That model's requests then run through it instead of the
request plane: templating, tokenization, stop strings and the OpenAI shapes stay the frontend's.
For custom pre/post-processing around (or instead of) the workers; see `examples/`.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Callable

from turbine.errors import ConfigError
from turbine.protocol.model_card import ModelDeploymentCard
from turbine.protocol.request import PreprocessedRequest
from turbine.protocol.response import EngineOutput

PythonEngine = Callable[[PreprocessedRequest], AsyncIterator[EngineOutput]]
EngineFactory = Callable[[ModelDeploymentCard], PythonEngine]


def load_factory(spec: str) -> EngineFactory:
    """Import `module:function`; a clear ConfigError if it is not there."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--exp-python-factory {spec!r} must look like module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--exp-python-factory: cannot import {module_name!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"--exp-python-factory: {module_name!r} has no callable {attr!r}")
    return factory  # type: ignore[no-any-return]
