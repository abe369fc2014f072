"""An example `--exp-python-factory`: a Python engine that answers with the prompt's words reversed.

    turbine frontend --exp-python-factory examples.reverse_words:make_engine

It runs inside the frontend for every discovered model (workers still announce the model), and
shows the contract: take the tokenized request, stream `EngineOutput` deltas, end with a finish
reason. A real one would call an in-process model, a remote API, or wrap the workers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import tokenizers

from turbine.frontend.python_engine import PythonEngine
from turbine.protocol.model_card import ModelDeploymentCard
from turbine.protocol.request import PreprocessedRequest
from turbine.protocol.response import EngineOutput, FinishReason


def make_engine(card: ModelDeploymentCard) -> PythonEngine:
    tokenizer = tokenizers.Tokenizer.from_file(str(Path(card.model_path) / "tokenizer.json"))

    async def engine(request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        words = tokenizer.decode(request.token_ids, skip_special_tokens=True).split()
        answer = tokenizer.encode(" ".join(reversed(words)), add_special_tokens=False).ids
        budget = request.stop.max_tokens
        for i, token in enumerate(answer[:budget]):
            yield EngineOutput(token_ids=[token])
            if i % 8 == 7:
                await asyncio.sleep(0)  # let other requests run
        finish = FinishReason.LENGTH if len(answer) > budget else FinishReason.STOP
        yield EngineOutput(finish_reason=finish, cached_tokens=0)

    return engine
