"""ldm-style attention look-alikes for the adapter's refusal tests.

Every class here has what an ldm ``CrossAttention`` look-alike exposes (``to_q``, ``to_k``,
``to_v``, ``to_out``, ``heads``; ``forward(x, context=None, mask=None)``) and none is an ldm class.
``FaithfulLookAlike`` computes exactly ldm's attention, so an adapter that reproduces the standard
forward from those attributes traces it correctly. Each class in ``UNREPRODUCIBLE`` computes
something else that the attributes do not reveal; an adapter that replaced its forward with the
standard computation would silently change the model, so it must refuse them.

``standard_forward(module, x, context)`` is that standard computation (float64), used by the tests
to show which classes match it.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class FaithfulLookAlike(nn.Module):
    """Same math as ldm CrossAttention; own class; scale stored as ``scale``."""

    def __init__(self, query_dim, context_dim=None, heads=2, dim_head=8):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def split(self, t):
        b, n, inner = t.shape
        return t.reshape(b, n, self.heads, inner // self.heads).transpose(1, 2)

    def scores(self, q, k):
        return q @ k.transpose(-1, -2) * self.scale

    def forward(self, x, context=None, mask=None):
        context = x if context is None else context
        q, k, v = self.split(self.to_q(x)), self.split(self.to_k(context)), self.split(self.to_v(context))
        s = self.scores(q, k)
        if mask is not None:
            s = s.masked_fill(~mask[:, None, None, :], -torch.finfo(s.dtype).max)
        out = s.softmax(dim=-1) @ v
        b, h, n, d = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, h * d))


class LearnedTemperature(FaithfulLookAlike):
    """Scores multiplied by a learned temperature that is not ``scale``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.temperature = nn.Parameter(torch.tensor(1.7))

    def scores(self, q, k):
        return super().scores(q, k) * self.temperature


class QKNorm(FaithfulLookAlike):
    """Queries and keys layer-normalised per head after the split (as some newer models do)."""

    def scores(self, q, k):
        norm = lambda t: torch.nn.functional.layer_norm(t, t.shape[-1:])  # noqa: E731
        return super().scores(norm(q), norm(k))


class ScoreBias(FaithfulLookAlike):
    """A learned additive bias per key position (relative-position style)."""

    def __init__(self, *args, max_keys=512, **kwargs):
        super().__init__(*args, **kwargs)
        self.bias = nn.Parameter(torch.randn(max_keys) * 0.5)

    def scores(self, q, k):
        return super().scores(q, k) + self.bias[: k.shape[-2]]


class OverriddenCrossAttention(nn.Module):
    """Made by subclassing ldm's CrossAttention (``isinstance`` holds) with a forward that adds
    the normalised query to the output: a class check alone would accept it."""

    def __new__(cls, *args, **kwargs):
        from ldm.modules.attention import CrossAttention

        class _Overridden(CrossAttention):
            def forward(self, x, context=None, mask=None):
                return super().forward(x, context, mask) + 0.1 * torch.nn.functional.normalize(x, dim=-1)

        return _Overridden(*args, **kwargs)


UNREPRODUCIBLE = {"learned_temperature": LearnedTemperature, "qk_norm": QKNorm, "score_bias": ScoreBias,
                  "overridden_ldm_forward": OverriddenCrossAttention}


def standard_forward(module, x, context=None):
    """ldm's attention from the look-alike attributes, in float64."""
    context = x if context is None else context
    w = lambda lin: lin.weight.double()  # noqa: E731
    h = module.heads
    q, k, v = x.double() @ w(module.to_q).T, context.double() @ w(module.to_k).T, context.double() @ w(module.to_v).T
    split = lambda t: t.reshape(t.shape[0], t.shape[1], h, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scale = getattr(module, "scale", None) or getattr(module, "dim_head", q.shape[-1]) ** -0.5
    out = (q @ k.transpose(-1, -2) * scale).softmax(-1) @ v
    out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    lin = module.to_out[0]
    return out @ lin.weight.double().T + lin.bias.double()
