"""Frontend test fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.unit.frontend.harness import Harness, served_harness


@pytest.fixture
async def harness() -> AsyncIterator[tuple[Harness, TestClient[Any, Any]]]:
    async for served in served_harness():
        yield served
