"""ModelDeploymentCard: what a worker tells every frontend about the model it serves."""

from __future__ import annotations

import msgspec

# What a model can serve; a card lists one or more (`--model-type`).
MODEL_TYPES = ("chat", "completions", "embedding")
# Request-plane endpoint of workers whose model embeds: payload is a msgpack list of token id lists,
# the reply one frame with a msgpack list of vectors (one per input, in order).
EMBED_ENDPOINT = "embed"
# Engine capabilities a card can list. "guided_decoding": the engine constrains its output to a
# grammar (structured outputs, enforced tool choice; `PreprocessedRequest.guided`).
CAP_GUIDED_DECODING = "guided_decoding"


def guided_capability(kind: str) -> str:
    """The capability of an engine that constrains its output to structured outputs of one
    `GUIDED_KINDS` kind only (an upstream server): "guided_decoding:json_schema", …; enforced tool
    choice needs the whole CAP_GUIDED_DECODING, or "json_schema" for a forced call without text
    around it (`frontend/forced_calls.py`)."""
    return f"{CAP_GUIDED_DECODING}:{kind}"


class ModelFile(msgspec.Struct, frozen=True):
    """One file of the model directory that frontends need, published by the worker.

    `location` is where the frontend fetches it (`store:turbine/files/{sha256}` or
    `nats-os:{bucket}/{sha256}`, see turbine/runtime/blobs.py); `sha256` (hex) is what the fetched
    bytes must hash to, or the frontend refuses the model.
    """

    name: str
    size: int
    sha256: str
    location: str


class ModelDeploymentCard(msgspec.Struct, frozen=True):
    """Published under `turbine/models/{namespace}/{name}/{instance_id:x}`, attached to the worker's lease.

    The frontend builds its preprocessor from `model_path` (tokenizer.json, tokenizer_config.json,
    config.json) and routes to the instance found under the same id in the instances prefix. When
    `model_path` is not on the frontend's machine (or its files differ), the frontend fetches `files`
    instead (turbine/runtime/model_files.py); cards of older workers have none.
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
    # The tokenizer/template/config files, published where frontends on other machines can fetch them.
    files: tuple[ModelFile, ...] = ()
    # What the engine honours beyond plain sampling: CAP_GUIDED_DECODING, the SAMPLING_KNOBS names of
    # turbine.protocol.request. Frontends refuse a request that needs one the card does not list with
    # a 400 naming the field, never ignore it.
    capabilities: tuple[str, ...] = ()
    # How the model writes tool calls and reasoning (turbine.postprocess.parsers.registry names);
    # frontends parse its output with them. None: leave the text as it is.
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
