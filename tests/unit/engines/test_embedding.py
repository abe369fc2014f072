"""The GPU-free engines' hash embeddings: deterministic, unit length, distinct per input."""

from __future__ import annotations

import math

import pytest

from turbine.config import WorkerConfig, parse_config
from turbine.engines.base import Embedder
from turbine.engines.echo import EchoEngine
from turbine.engines.embedding import EMBEDDING_DIM, hash_embedding

pytestmark = pytest.mark.unit


async def test_echo_embeds_deterministically() -> None:
    engine = EchoEngine()
    assert isinstance(engine, Embedder)
    a = await engine.embed([1, 2, 3])
    assert a == await engine.embed([1, 2, 3]) == hash_embedding([1, 2, 3])
    assert len(a) == EMBEDDING_DIM
    assert math.isclose(math.fsum(x * x for x in a), 1.0)
    assert a != await engine.embed([1, 2, 4])
    assert hash_embedding([]) == [0.0] * EMBEDDING_DIM


def test_model_type_flag() -> None:
    assert parse_config(WorkerConfig, [], {}, prog="t").model_types == ("chat", "completions")
    cfg = parse_config(WorkerConfig, ["--model-type", "embedding"], {}, prog="t")
    assert cfg.model_types == ("embedding",)
