"""Build a model's router from the frontend's config (one router per model)."""

from __future__ import annotations

from turbine.config import FrontendConfig
from turbine.router.base import Router
from turbine.router.kv_router import KvRouter, KvRouterSettings, LoadRouter
from turbine.router.simple import DirectRouter, RandomRouter, RoundRobinRouter


def make_router(cfg: FrontendConfig) -> Router:
    mode = cfg.router_mode
    if mode == "round-robin":
        return RoundRobinRouter()
    if mode == "random":
        return RandomRouter()
    if mode == "direct":
        return DirectRouter()
    if mode in ("least-loaded", "power-of-two"):
        return LoadRouter(mode)
    if mode == "kv":
        return KvRouter(
            KvRouterSettings(
                overlap_score_weight=cfg.kv_overlap_score_weight,
                temperature=cfg.router_temperature,
                use_kv_events=cfg.kv_events,
                ttl_s=cfg.router_ttl_secs,
                active_decode_blocks_threshold=cfg.active_decode_blocks_threshold,
                active_prefill_tokens_threshold=cfg.active_prefill_tokens_threshold,
                block_size_override=cfg.kv_cache_block_size,
            )
        )
    raise ValueError(f"unknown router mode {mode!r}")
