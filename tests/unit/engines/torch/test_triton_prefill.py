"""The paged prefill kernel against SDPA on gathered contexts, through Triton's interpreter on the CPU
(a subprocess: the interpreter is chosen when the kernel module is imported)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

pytestmark = pytest.mark.slow  # Triton's interpreter, in a fresh interpreter process

SCRIPT = r"""
import random
import torch
import torch.nn.functional as F
from turbine.engines.torch.triton_prefill import paged_prefill

def reference(q, kc, vc, seqs, bs, scale, window):
    out = torch.zeros_like(q)
    heads, dim = q.shape[1:]
    kv_heads = kc.shape[2]
    for start, q_len, ctx, table in seqs:
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(ctx)])
        k = kc.view(-1, kv_heads, dim)[slots].transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        v = vc.view(-1, kv_heads, dim)[slots].transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        q_pos = torch.arange(ctx - q_len, ctx)[:, None]
        k_pos = torch.arange(ctx)[None, :]
        allow = k_pos <= q_pos
        if window:
            allow &= k_pos > q_pos - window
        qs = q[start : start + q_len].transpose(0, 1)
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=allow, scale=scale)
        out[start : start + q_len] = o.transpose(0, 1)
    return out

torch.manual_seed(0)
rng = random.Random(0)
heads, kv_heads, dim, bs, blocks = 4, 2, 16, 16, 64
kc = torch.randn(blocks, bs, kv_heads, dim)
vc = torch.randn(blocks, bs, kv_heads, dim)
for window in (None, 20):
    # (new tokens, cached before): fresh prompts, chunks after a cached prefix, more than one
    # program's rows, a single token.
    chunks = [(5, 0), (70, 0), (3, 40), (33, 17), (1, 50)]
    free = list(range(1, blocks))
    rng.shuffle(free)
    seqs, row = [], 0
    for q_len, cached in chunks:
        ctx = q_len + cached
        seqs.append((row, q_len, ctx, [free.pop() for _ in range(-(-ctx // bs))]))
        row += q_len
    q = torch.randn(row, heads, dim)
    out = torch.zeros_like(q)
    width = max(len(s[3]) for s in seqs)
    tables = torch.tensor([s[3] + [0] * (width - len(s[3])) for s in seqs], dtype=torch.int32)
    ints = lambda i: torch.tensor([s[i] for s in seqs], dtype=torch.int32)
    paged_prefill(q, kc, vc, out, ints(0), ints(1), ints(2), tables, max(s[1] for s in seqs), 0.25, window)
    err = (out - reference(q, kc, vc, seqs, bs, 0.25, window)).abs().max().item()
    assert err < 1e-4, (window, err)
print("ok")
"""


def test_paged_prefill_matches_sdpa_on_gathered_contexts() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
