"""A reachable endpoint of one worker process, as registered in discovery."""

from __future__ import annotations

import msgspec

INSTANCES_ROOT = "turbine/instances/"
MODELS_ROOT = "turbine/models/"


class Instance(msgspec.Struct, frozen=True):
    namespace: str
    component: str
    endpoint: str
    instance_id: int
    transport: str
    address: str

    def key(self) -> str:
        return instance_key(self.namespace, self.component, self.endpoint, self.instance_id)


def instance_key(namespace: str, component: str, endpoint: str, instance_id: int) -> str:
    return f"{INSTANCES_ROOT}{namespace}/{component}/{endpoint}/{instance_id:x}"


def instances_prefix(namespace: str) -> str:
    return f"{INSTANCES_ROOT}{namespace}/"


def model_key(namespace: str, model: str, instance_id: int) -> str:
    # Model names may contain "/" (e.g. "org/name"); they stay readable, the id is always last.
    return f"{MODELS_ROOT}{namespace}/{model}/{instance_id:x}"


def models_prefix(namespace: str) -> str:
    return f"{MODELS_ROOT}{namespace}/"


def instance_id_from_key(key: str) -> int:
    """The trailing hex id of an instance or model key."""
    return int(key.rsplit("/", 1)[1], 16)
