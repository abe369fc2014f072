"""KV events over ZeroMQ (`--event-plane zmq`) with real processes, without a broker.

Frontend Z routes with `--router-mode kv --event-plane zmq` and binds the ZMQ endpoint; a mocker
process with two workers publishes to it. How this proves the events came over ZMQ: each prefix
group's first request goes through a second frontend, R, in round-robin mode (`--event-plane
request`: it binds nothing and follows no events), so Z's own routing history knows nothing of the
group. Z follows the workers from before any group exists (it asked for its follow-start dumps
before a warm-up request through it), and after that it dumps a worker again only when a KV event
that reached it shows a gap. So when Z routes the group's second request to the holder with a
nonzero `x-turbine-overlap-blocks`, it learned where the prefix is cached from something that came
over ZMQ. (Checked the other way round: with the workers publishing to another endpoint, Z learns
no group and this test fails.)
"""

from __future__ import annotations

import json
import random
import time

import pytest

from tests.e2e.conftest import MODEL, Stack, free_port, http, wait_instances

pytestmark = pytest.mark.e2e

BLOCK = 16
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda"]
GROUPS = 3


def complete(url: str, prompt: str) -> tuple[str, int]:
    """(worker, overlap blocks) of one completion."""
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 2}).encode()
    status, headers, text = http(
        "POST", url + "/v1/completions", body, {"Content-Type": "application/json"}, timeout=10
    )
    assert status == 200, text
    return headers["x-turbine-worker"], int(headers.get("x-turbine-overlap-blocks", "0"))


def test_kv_routing_follows_events_over_zmq(stack: Stack) -> None:
    plane = ("--event-plane", "zmq", "--zmq-event-endpoint", f"tcp://127.0.0.1:{free_port()}")
    z_proc, z = stack.frontend("--router-mode", "kv", *plane)
    _, r = stack.frontend("--router-mode", "round-robin")
    worker = stack.worker(
        "--engine",
        "mocker",
        "--num-workers",
        "2",
        "--block-size",
        str(BLOCK),
        "--speedup-ratio",
        "50",
        *plane,
    )
    wait_instances(z, 2)
    wait_instances(r, 2)
    complete(z, "warm-up: Z follows both workers from now on")
    rng = random.Random(5)

    # One try per group: a second request through Z would add to Z's own history, so a try that
    # came too early (the event still on its way) is not repeated but replaced by a new group.
    learned: dict[str, str] = {}
    tries = 0
    deadline = time.monotonic() + 10
    while len(learned) < GROUPS:
        assert time.monotonic() < deadline, f"Z learned {len(learned)} of {GROUPS} groups in {tries} tries"
        tries += 1
        prefix = f"[group {tries}] " + " ".join(rng.choice(WORDS) for _ in range(150))
        holder, _ = complete(r, prefix + " first")
        time.sleep(0.2)  # the stored event is on its way from the worker to Z over ZMQ
        chosen, overlap = complete(z, prefix + " second")
        if chosen == holder and overlap >= 8:
            learned[prefix] = holder
    assert len(set(learned.values())) == 2  # R alternates: both workers' events reached Z

    assert "receiving on zmq" in z_proc.log()
    assert "publishing to zmq" in worker.log()
