"""Prometheus metrics at /metrics, scraped and parsed with prometheus_client's own parser."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import MODEL, Stack, http, wait_instances

pytestmark = pytest.mark.e2e


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, headers, body = http("GET", url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all(dict(ls).get(k) == x for k, x in labels.items())
    )


def test_metrics_count_requests_routing_and_cache_hits(stack: Stack) -> None:
    _, url = stack.frontend("--router-mode", "kv", "--metrics-prefix", "tb")
    stack.worker("--engine", "mocker", "--num-workers", "2", "--block-size", "16", "--speedup-ratio", "100")
    wait_instances(url, 2)
    prompt = "metrics are counted once per request " * 20
    for _ in range(4):
        body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 3}).encode()
        assert http("POST", url + "/v1/completions", body, {"Content-Type": "application/json"})[0] == 200
    bad = json.dumps({"model": "nope", "prompt": "x"}).encode()
    assert http("POST", url + "/v1/completions", bad, {"Content-Type": "application/json"})[0] == 404

    m = _scrape(url)
    assert _total(m, "tb_requests_total", model=MODEL, endpoint="/v1/completions", status="200") == 4
    assert _total(m, "tb_requests_total", model="nope", status="404") == 1
    assert _total(m, "tb_routing_decisions_total", model=MODEL) == 4
    assert _total(m, "tb_time_to_first_token_seconds_count", model=MODEL) == 4
    assert _total(m, "tb_output_sequence_tokens_sum", model=MODEL) == 12
    assert _total(m, "tb_inter_token_latency_seconds_count", model=MODEL) == 4
    assert _total(m, "tb_live_workers", model=MODEL) == 2
    assert _total(m, "tb_inflight_requests", model=MODEL) == 0
    # The same prompt four times: every request after the first hits the prefix cache.
    cached = _total(m, "tb_cached_tokens_total", model=MODEL)
    prompt_tokens = _total(m, "tb_prompt_tokens_total", model=MODEL)
    assert 0.6 * prompt_tokens < cached < prompt_tokens
    assert _total(m, "tb_routing_overlap_blocks_total", model=MODEL) > 0
