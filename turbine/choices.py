"""The allowed values of every option that picks one of a few names, declared once.

Both the config (which refuses other values with one clear line) and the stage that acts on the
value read these tuples, so the two cannot drift apart. This module imports nothing, so any layer
may read it.
"""

from __future__ import annotations

ROUTER_MODES = ("round-robin", "random", "least-loaded", "power-of-two", "kv", "direct")
# Router modes that count each worker's active load (the router queue needs it).
LOAD_COUNTING_MODES = ("least-loaded", "power-of-two", "kv")
QUEUE_POLICIES = ("fcfs", "wspt")
AFFINITY_MODES = ("hard", "soft")
DISCOVERY_BACKENDS = ("file", "mem", "etcd")
REQUEST_PLANES = ("tcp", "nats", "http")
# request: frontends stream each worker's events over the request plane; nats: one broker for all;
# zmq: workers publish straight to the one frontend, which binds --zmq-event-endpoint.
EVENT_PLANES = ("request", "nats", "zmq")
ENGINES = ("mocker", "echo", "torch", "scripted", "openai")
DEVICES = ("cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
CPU_KERNELS = ("auto", "turbine", "torch")
LOAD_FORMATS = ("auto", "dummy")
# The names of turbine.postprocess.parsers.registry's tables (a unit test holds them equal).
TOOL_CALL_PARSERS = (
    "hermes",
    "llama3_json",
    "mistral",
    "pythonic",
    "deepseek_v3",
    "deepseek_v3_1",
    "qwen3_coder",
    "harmony",
)
REASONING_PARSERS = ("basic", "qwen3", "deepseek_r1", "gpt_oss")
REASONING_FIELD_NAMES = ("reasoning_content", "reasoning")
# --upstream-mode: how the openai engine sends prompts (turbine/engines/upstream/params.py).
UPSTREAM_MODES = ("auto", "token", "text")
GUIDED_DIALECTS = ("none", "vllm", "sglang", "llama.cpp")
LOG_LEVELS = ("debug", "info", "warning", "error")
MODEL_FILES_VIA = ("auto", "store", "nats", "none")
