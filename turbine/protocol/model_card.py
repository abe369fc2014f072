"""ModelDeploymentCard: what a worker tells every frontend about the model it serves."""

from __future__ import annotations

import msgspec

# What a model can serve; a card lists one or more (`--model-type`).
MODEL_TYPES = ("chat", "completions", "embedding")
# Request-plane endpoint of workers whose model embeds: payload is a msgpack list of token id lists,
# the reply one frame with a msgpack list of vectors (one per input, in order).
EMBED_ENDPOINT = "embed"


class ModelDeploymentCard(msgspec.Struct, frozen=True):
    """Published under `turbine/models/{namespace}/{name}/{instance_id:x}`, attached to the worker's lease.

    The frontend builds its preprocessor from `model_path` (tokenizer.json, tokenizer_config.json,
    config.json) and routes to the instance found under the same id in the instances prefix.
    """

    name: str
    model_path: str
    namespace: str
    component: str
    endpoint: str
    instance_id: int
    # Any of MODEL_TYPES: "chat", "completions", "embedding".
    model_types: tuple[str, ...] = ("chat", "completions")
    context_length: int = 4096
    kv_block_size: int = 64
    # Worker capacity, for the router. None when the engine has no such notion.
    total_kv_blocks: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
