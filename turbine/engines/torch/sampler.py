"""Turn a step's logits into tokens: greedy, temperature, top-k, top-p, min-p, per-request seeds.

Semantics follow vLLM's: logprobs are of the model's raw distribution (log-softmax of the logits,
before any processing), so they do not depend on the sampling knobs; penalties, logit bias, allowed
tokens and bad words adjust the logits first (logits_processors.py); `min_tokens` bans the stop and
EOS ids by masking their logits; temperature 0 (or top-k 1) is greedy; otherwise temperature scales
the logits, min-p drops tokens below `min_p × max prob`, then top-k and top-p (nucleus) trim the
rest; a guided row's grammar (`grammar.py`) sets the tokens it disallows to -inf before any of it.
Random draws use the exponential race (argmax of p / E with E ~ Exp(1) is a draw from p), so a
seeded request draws from its own generator and gets the same tokens whatever it is batched with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from turbine.engines.core.scheduler import Sampled
from turbine.engines.torch.grammar import GuideRow, constrain
from turbine.engines.torch.logits_processors import RowAdjust, adjust_logits


@dataclass(slots=True)
class RowParams:
    """One sequence's sampling knobs for this step."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0: no top-k."""
    min_p: float = 0.0
    generator: torch.Generator | None = None
    """A seeded request's own generator; None: the shared one."""
    logprobs: int | None = None
    """Alternatives wanted (0..20), None: no logprobs."""
    banned: list[int] = field(default_factory=list)
    """Token ids that must not be sampled now (stop/EOS ids under min_tokens)."""
    adjust: RowAdjust | None = None
    """Penalties, logit bias, allowed tokens and bad words (logits_processors.py); None: none."""
    guide: GuideRow | None = None
    """The row's grammar (guided decoding): only the tokens it allows can be sampled."""

    plain_greedy: bool = field(init=False)
    """Greedy with nothing else to apply but a grammar: the argmax of the raw logits, or of the
    masked ones (no logprobs, banned tokens or adjustments)."""

    def __post_init__(self) -> None:
        self.plain_greedy = self.greedy and self.logprobs is None and not self.banned and self.adjust is None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


def sample(logits: torch.Tensor, params: list[RowParams]) -> list[Sampled]:
    """One token per row of `logits` ([rows, vocab], float32)."""
    raw = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in params) else None
    if any(p.adjust is not None for p in params):
        logits = adjust_logits(logits, [p.adjust for p in params])
    if any(p.banned for p in params):
        logits = logits.clone()
        for i, p in enumerate(params):
            if p.banned:
                logits[i, p.banned] = float("-inf")
    guided = [i for i, p in enumerate(params) if p.guide is not None]
    if guided:
        logits = constrain(logits, guided, [g for p in params if (g := p.guide) is not None])
    tokens = torch.argmax(logits, dim=-1)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        chosen = _sample_random(logits[random_rows], [params[i] for i in random_rows])
        tokens[random_rows] = chosen
    token_list = tokens.tolist()
    out: list[Sampled] = []
    want_top = max((p.logprobs or 0) for p in params)
    top_vals = top_ids = None
    if raw is not None and want_top:
        top = torch.topk(raw, want_top, dim=-1)
        top_vals, top_ids = top.values.tolist(), top.indices.tolist()
    token_lp = raw.gather(1, tokens[:, None]).squeeze(1).tolist() if raw is not None else None
    for i, (p, tok) in enumerate(zip(params, token_list, strict=True)):
        if p.logprobs is None or token_lp is None:
            out.append(Sampled(tok))
            continue
        alternatives: list[tuple[int, float]] = []
        if p.logprobs and top_ids is not None and top_vals is not None:
            alternatives = list(zip(top_ids[i][: p.logprobs], top_vals[i][: p.logprobs], strict=True))
        out.append(Sampled(tok, False, token_lp[i], alternatives))
    return out


def _sample_random(logits: torch.Tensor, params: list[RowParams]) -> torch.Tensor:
    device = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)
    logits = logits / temps[:, None]
    probs = torch.softmax(logits, dim=-1)
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype, device=device)
        floor = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        probs = probs.masked_fill(probs < floor, 0.0)
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        probs = _top_k_top_p(probs, params)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    race = torch.empty_like(probs)
    shared = [i for i, p in enumerate(params) if p.generator is None]
    if shared:
        race[shared] = torch.empty((len(shared), probs.shape[1]), device=device).exponential_()
    for i, p in enumerate(params):
        if p.generator is not None:
            race[i] = torch.empty(probs.shape[1], device=device).exponential_(generator=p.generator)
    return torch.argmax(probs / race, dim=-1)


def _top_k_top_p(probs: torch.Tensor, params: list[RowParams]) -> torch.Tensor:
    """Zero every token outside each row's top-k and top-p nucleus (the most likely one always stays)."""
    vocab = probs.shape[1]
    device = probs.device
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None, :]
    k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
    sorted_probs = sorted_probs.masked_fill(ranks >= k[:, None], 0.0)
    # Top-p applies to what top-k left, renormalised (vLLM's order).
    kept = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    top_p = torch.tensor([p.top_p for p in params], dtype=probs.dtype, device=device)
    before = torch.cumsum(kept, dim=-1) - kept  # mass strictly ahead of each token
    drop = before >= top_p[:, None]
    drop[:, 0] = False
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)
