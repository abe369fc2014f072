"""Engine load from an upstream's Prometheus `/metrics` (pure parsing).

Names per engine (gauges; summed over label sets, or only the samples of one data-parallel rank):

- vLLM: `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`
  (older releases: `vllm:gpu_cache_usage_perc`);
- SGLang: `sglang:num_running_reqs`, `sglang:num_queue_reqs`, `sglang:token_usage`;
- llama-server: `llamacpp:requests_processing`, `llamacpp:requests_deferred`,
  `llamacpp:kv_cache_usage_ratio`.

vLLM labels each rank's samples `engine="<rank>"`. llama-cpp-python's server has no /metrics; its
load is the sidecar's own in-flight count.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

_RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs", "llamacpp:requests_processing")
_WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs", "llamacpp:requests_deferred")
_KV_USAGE = (
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "sglang:token_usage",
    "llamacpp:kv_cache_usage_ratio",
)
_RANK_LABELS = ("engine", "dp_rank")


@dataclass(frozen=True, slots=True)
class EngineLoad:
    running: int
    waiting: int
    kv_usage: float | None  # fraction of the KV cache in use, when reported


def parse_load(text: str, rank: int | None = None) -> EngineLoad | None:
    """The load in a /metrics page, or None when it has none of the known names."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    wanted = set(_RUNNING + _WAITING + _KV_USAGE)
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError:
        return None
    for family in families:
        for sample in family.samples:
            if sample.name not in wanted:
                continue
            if rank is not None:
                label = next((sample.labels[k] for k in _RANK_LABELS if k in sample.labels), None)
                if label is not None and label != str(rank):
                    continue
            sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
            counts[sample.name] = counts.get(sample.name, 0) + 1
    if not sums:
        return None
    running = next((sums[n] for n in _RUNNING if n in sums), 0.0)
    waiting = next((sums[n] for n in _WAITING if n in sums), 0.0)
    # A fraction is averaged over the label sets it was summed over.
    usage = next((sums[n] / counts[n] for n in _KV_USAGE if n in sums), None)
    return EngineLoad(int(running), int(waiting), usage)
