"""Pure pieces of the upstream engine: chunk parsing, re-tokenizing, /metrics, sent-prompt history."""

from __future__ import annotations

import pytest

from turbine.engines.upstream.history import SentHistory
from turbine.engines.upstream.metrics import EngineLoad, parse_load
from turbine.engines.upstream.params import Retokenizer, parse_chunk
from turbine.kv.hashing import block_hashes
from turbine.models import bundled_model_path
from turbine.preprocess.tokenizer import load_model_files
from turbine.protocol.kv_events import KvCleared, KvRemoved, KvStored
from turbine.protocol.response import FinishReason

pytestmark = pytest.mark.unit

TOKENIZER = load_model_files(bundled_model_path()).tokenizer


def test_parse_chunk_shapes() -> None:
    vllm = {"choices": [{"text": "a", "token_ids": [5], "finish_reason": None}]}
    assert parse_chunk(vllm, TOKENIZER).token_ids == [5]
    server = {"choices": [{"text": "b", "finish_reason": "length"}], "tokens": [6, 7]}
    chunk = parse_chunk(server, TOKENIZER)
    assert chunk.token_ids == [6, 7] and chunk.finish_reason is FinishReason.LENGTH
    usage = {"choices": [], "usage": {"prompt_tokens_details": {"cached_tokens": 32}}}
    assert parse_chunk(usage, TOKENIZER).cached_tokens == 32
    assert parse_chunk({"error": {"message": "boom"}}, TOKENIZER).error == "boom"
    text_only = parse_chunk({"choices": [{"text": "c", "finish_reason": "stop"}]}, TOKENIZER)
    assert text_only.token_ids is None and text_only.finish_reason is FinishReason.STOP


def test_retokenizer_matches_whole_text_tokenization() -> None:
    text = "The quick brown fox jumps over the lazy dog.\nThen it sleeps, 42 times."
    whole = TOKENIZER.encode(text, add_special_tokens=False).ids
    for step in (1, 3, 7):
        retok = Retokenizer(TOKENIZER)
        ids: list[int] = []
        for i in range(0, len(text), step):
            ids += retok.feed(text[i : i + step])
        ids += retok.flush()
        assert ids == whole


METRICS = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25
"""


def test_metrics_of_each_engine_and_rank() -> None:
    assert parse_load(METRICS) == EngineLoad(4, 2, 0.375)
    assert parse_load(METRICS, rank=1) == EngineLoad(1, 0, 0.25)
    sglang = "sglang:num_running_reqs 2\nsglang:num_queue_reqs 5\nsglang:token_usage 0.1\n"
    assert parse_load(sglang) == EngineLoad(2, 5, 0.1)
    llama = "llamacpp:requests_processing 1\nllamacpp:requests_deferred 0\n"
    assert parse_load(llama) == EngineLoad(1, 0, None)
    assert parse_load("other_metric 1\n") is None
    assert parse_load("not { prometheus") is None


def test_history_records_evicts_and_expires() -> None:
    now = [0.0]
    history = SentHistory(block_size=4, capacity_blocks=3, ttl_s=10, clock=lambda: now[0])
    a = block_hashes(list(range(8)), 4).sequence
    out = history.record(list(range(8)))
    assert isinstance(out[0], KvStored) and [b.block_hash for b in out[0].blocks] == a
    b = block_hashes(list(range(100, 108)), 4).sequence
    now[0] = 5.0
    out = history.record(list(range(100, 108)))  # 4 blocks > capacity 3: the oldest goes
    assert out[1] == KvRemoved([a[0]])
    now[0] = 12.0
    assert history.expire() == [KvRemoved([a[1]])]  # sent at 0, older than the 10 s TTL
    assert sorted(history.cached()) == sorted(b)
    assert history.clear() == [KvCleared()] and history.cached() == []
