"""Tests of ``i2am_fast.trace`` on tiny random-weight systems (``tests/systems.py``).

What is checked, per system (Paint-by-Example, the paper's custom 12-channel model with CFG as
one doubled batch and as two calls per step, a StableVITON-like module with spatial keys with
and without CFG, IP-Adapter, and a UNet whose 7 context tokens need ``reference_grid``):

* The traced run's output equals the untraced run's to 1e-4 (max absolute, float32, CPU).
* Processors: the cross-attention processors are replaced inside the ``with`` block, every
  other processor is left alone, and afterwards every processor is the very same object as
  before, also after an exception inside the block and after a failing run; a nested second
  ``trace`` on the same model raises.
* Every map equals an INDEPENDENT float64 computation: a separate run with the same seed in
  which each cross-attention layer carries our own capturing processor (``CaptureAttnProcessor``,
  a line-for-line mirror of diffusers' ``AttnProcessor2_0``, or ``CaptureIPAdapterProcessor``
  for the IP-Adapter image branch) that records ``(layer, step, call within step, q, k, v)``.
  Per call we evaluate ``attention_with_maps_reference`` (float64, materialising) with the
  ``map_batch`` / ``query_weights`` / ``probe_index`` that docs/design.md ("What is computed")
  prescribes, accumulate per (layer, time group, image, head), and read the result the way it
  specifies (bicubic resize + clamp to the common grid, mean over layers and heads or one
  head, optional min-max normalisation, or one layer at its native grid).

Tolerances. The op computes in float32 and the traced run's trajectory may differ from the
capture run's by float32 rounding, so raw maps (``normalize=False``) are compared with
``rtol = 1e-4`` and ``atol = 1e-4 * max|expected|``. Normalised maps are checked against the
normalisation formula ``(m - min) / (max - min + 1e-8)`` applied (in float64) to the same
read's raw map, with ``atol = 1e-4``, wherever the raw map's spread ``max - min`` is at least
1e-2 of ``max|m|``; where it is smaller (e.g. a 1x1 reference map, or the uniform maps of the
custom model's all-zero unconditional embeddings) min-max normalisation only amplifies
rounding noise, and only ``0 <= normalised <= 1`` is required (exactly 0 for a single cell).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import i2am_fast
from i2am_fast.ops.reference import attention_with_maps_reference

import systems

RTOL = 1e-4  # raw maps: rtol and atol = RTOL * max|expected|
OUTPUT_ATOL = 1e-4  # traced vs untraced outputs, max absolute
NORM_ATOL = 1e-4  # normalised vs formula applied to the raw read
NORM_MIN_SPREAD = 1e-2  # ... where (max - min) >= NORM_MIN_SPREAD * max|raw|

# Errors a bad argument may raise; the message must name what to pass (checked by `match`).
BAD_INPUT = (ValueError, IndexError, KeyError, TypeError)


def trace(target, **kwargs):
    return i2am_fast.trace(target, **kwargs)


# ----------------------------------------------------------------------------------------------
# The independent capture
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Record:
    layer: str
    step: int
    call: int  # index of the denoiser call within its step (separate CFG: 0 uncond, 1 cond)
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


class Recorder:
    """Tracks the step of each denoiser call (its timestep's index in the scheduler's
    ``timesteps``, or, for a bare module, a new step at each new timestep value) and collects
    the captured q, k, v."""

    def __init__(self, system: systems.System):
        self.system = system
        self.records: list[Record] = []
        self.step: Optional[int] = None
        self.call = 0
        self._last_t = None
        self._bare_step = -1

    def on_forward(self, module, args, kwargs):
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        t = float(torch.as_tensor(t).reshape(-1)[0])
        if self.system.scheduler is not None:
            step = [float(x) for x in self.system.scheduler.timesteps].index(t)
        else:
            if t != self._last_t:
                self._bare_step += 1
                self._last_t = t
            step = self._bare_step
        if step == self.step:
            self.call += 1
        else:
            self.step, self.call = step, 0

    def add(self, layer, q, k, v):
        self.records.append(Record(layer, self.step, self.call, q.detach().clone(), k.detach().clone(), v.detach().clone()))


class CaptureAttnProcessor:
    """diffusers' ``AttnProcessor2_0``, line for line (no attention mask in these systems),
    recording q, k, v after the head split."""

    def __init__(self, layer: str, recorder: Recorder):
        self.layer, self.recorder = layer, recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        assert attention_mask is None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        self.recorder.add(self.layer, query, key, value)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class CaptureIPAdapterProcessor:
    """diffusers' ``IPAdapterAttnProcessor2_0`` (tuple input, no IP masks), recording the
    image branch's q, k (``to_k_ip``), v (``to_v_ip``) as layer ``<name>.ip<index>``; the
    text branch is not recorded."""

    def __init__(self, layer: str, recorder: Recorder, original):
        self.layer, self.recorder, self.original = layer, recorder, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, scale=1.0, ip_adapter_masks=None):
        assert attention_mask is None and ip_adapter_masks is None and attn.spatial_norm is None
        encoder_hidden_states, ip_hidden_states = encoder_hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = encoder_hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        orig = self.original
        for index, (ip_states, ip_scale, to_k_ip, to_v_ip) in enumerate(
            zip(ip_hidden_states, orig.scale, orig.to_k_ip, orig.to_v_ip)
        ):
            assert ip_scale != 0
            ip_key = to_k_ip(ip_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ip_value = to_v_ip(ip_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            # one map layer per IP-Adapter image branch, named "<attention module>.ip<index>"
            # (the tracer's naming; the text branch gets no maps)
            self.recorder.add(f"{self.layer}.ip{index}", query, ip_key, ip_value)
            ip_out = F.scaled_dot_product_attention(query, ip_key, ip_value, attn_mask=None, dropout_p=0.0, is_causal=False)
            ip_out = ip_out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
            hidden_states = hidden_states + ip_scale * ip_out
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            raise AssertionError("not in these systems")
        return hidden_states / attn.rescale_output_factor


def capture_run(system: systems.System, seed: int = 0):
    """Run ``system`` once with capturing processors; returns (output, records). Restores the
    original processor objects afterwards."""
    recorder = Recorder(system)
    layers = system.cross_attention_layers()
    originals = {name: attn.processor for name, attn in layers.items()}
    for name, attn in layers.items():
        proc = (
            CaptureIPAdapterProcessor(name, recorder, originals[name])
            if system.ip_adapter
            else CaptureAttnProcessor(name, recorder)
        )
        attn.set_processor(proc)
    handle = system.denoiser.register_forward_pre_hook(recorder.on_forward, with_kwargs=True)
    try:
        out = system.run(seed=seed)
    finally:
        handle.remove()
        for name, attn in layers.items():
            attn.set_processor(originals[name])
    return out, recorder.records


# ----------------------------------------------------------------------------------------------
# Expected maps from the capture
# ----------------------------------------------------------------------------------------------


def resize_mask(mask: torch.Tensor, grid) -> torch.Tensor:
    """eq. 17 weights at a layer: bilinear, antialiased, flattened (float64)."""
    m = F.interpolate(mask.double()[None, None], size=tuple(grid), mode="bilinear", align_corners=False, antialias=True)
    return m[0, 0].reshape(-1)


def resize_map(x: torch.Tensor, size) -> torch.Tensor:
    """[C, h, w] -> [C, *size]: bicubic then clamp at 0; identity at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=tuple(size), mode="bicubic", align_corners=False)[0].clamp_min(0)


def normalize_map(m: torch.Tensor) -> torch.Tensor:
    return (m - m.min()) / (m.max() - m.min() + 1e-8)


def entries_for(layout: str, cfg: str, batch: int, call: int):
    """(batch index, image index) pairs that get maps for one denoiser call."""
    if layout == "doubled":
        n = batch // 2
        return {
            "cond": [(b, b - n) for b in range(n, batch)],
            "uncond": [(b, b) for b in range(n)],
            "both": [(b, b) for b in range(batch)],
        }[cfg]
    if layout == "separate":
        wanted = {"cond": call == 1, "uncond": call == 0, "both": True}[cfg]
        if not wanted:
            return []
        offset = batch * call if cfg == "both" else 0
        return [(b, b + offset) for b in range(batch)]
    assert layout == "none" and cfg != "uncond"
    return [(b, b) for b in range(batch)]


def num_images(system, layout: str, cfg: str) -> int:
    if layout == "none":
        return system.n_images * (2 if system.cfg_layout == "doubled" else 1)
    return system.n_images * (2 if cfg == "both" else 1)


class ExpectedMaps:
    """The expected reads, from float64 states accumulated per (layer, time group, image, head)."""

    def __init__(self, system, records, *, cfg="cond", time_groups=5, probes=(), inpaint_mask=None,
                 cfg_layout=None, layers=None, reference_layout=None):
        self.system = system
        self.G = time_groups
        self.T = system.num_steps
        self.probes = [tuple(p) for p in probes]
        layout = cfg_layout or system.cfg_layout
        self.n_images = num_images(system, layout, cfg)
        reference_layout = reference_layout or system.reference_layout
        h, w = system.latent_grid
        self.state = {}
        self.grids = {}
        self.ref_grids = {}
        self.offsets = {}
        self.num_keys = {}
        for rec in records:
            if layers is not None and rec.layer not in layers:
                continue
            B, H, Nq, _ = rec.q.shape
            Nk = rec.k.shape[2]
            grid = tuple(system.layer_grid(rec.layer))
            assert grid[0] * grid[1] == Nq, (rec.layer, grid, Nq)
            ref_grid, offset = reference_layout(rec.layer, Nk, grid)
            assert offset + ref_grid[0] * ref_grid[1] == Nk
            self.grids[rec.layer], self.ref_grids[rec.layer] = grid, tuple(ref_grid)
            self.offsets[rec.layer], self.num_keys[rec.layer] = offset, Nk
            P = len(self.probes)
            st = self.state.setdefault(rec.layer, {
                "gen": torch.zeros(self.G, self.n_images, H, *grid, dtype=torch.float64),
                "ref": torch.zeros(self.G, self.n_images, H, *ref_grid, dtype=torch.float64),
                "probe": torch.zeros(self.G, self.n_images, H, P, *ref_grid, dtype=torch.float64),
            })
            entries = entries_for(layout, cfg, B, rec.call)
            if not entries:
                continue
            tau = rec.step * self.G // self.T
            weights = None if inpaint_mask is None else resize_mask(inpaint_mask, grid)
            probe_index = None
            if P:
                hl, wl = grid
                probe_index = torch.tensor([(r * hl // h) * wl + (c * wl // w) for r, c in self.probes], dtype=torch.long)
            out = attention_with_maps_reference(
                rec.q, rec.k, rec.v, map_batch=[b for b, _ in entries], query_weights=weights,
                probe_index=probe_index, compute_dtype=torch.float64,
            )
            n_grid = ref_grid[0] * ref_grid[1]
            for slot, (_, image) in enumerate(entries):
                st["gen"][tau, image] += out.generated[slot].reshape(H, *grid)
                st["ref"][tau, image] += out.reference[slot][:, offset:].reshape(H, *ref_grid)
                if P:
                    st["probe"][tau, image] += out.probes[slot][:, :, offset:].reshape(H, P, *ref_grid)
            assert n_grid == Nk - offset
        self.layer_names = sorted(self.state)
        self.finest_ref = max(self.ref_grids.values(), key=lambda g: g[0] * g[1])

    def _pick(self, x, time_group, image, head):
        x = x[:, image]
        x = x.sum(0) if time_group is None else x[time_group]
        return x  # [H, ...]

    def _read(self, kind, time_group, head, image, normalize, layer, probe=None):
        def one(name, size):
            x = self._pick(self.state[name][kind], time_group, image, head)
            if probe is not None:
                x = x[:, probe]
            if size is not None:
                x = resize_map(x, size)
            return x.mean(0) if head is None else x[head]

        if layer is not None:
            m = one(layer, None)
        else:
            size = self.system.latent_grid if kind == "gen" else self.finest_ref
            m = torch.stack([one(name, size) for name in self.layer_names]).mean(0)
        return normalize_map(m) if normalize else m

    def generated(self, time_group=None, head=None, image=0, normalize=False, layer=None):
        return self._read("gen", time_group, head, image, normalize, layer)

    def reference(self, time_group=None, head=None, image=0, normalize=False, layer=None):
        return self._read("ref", time_group, head, image, normalize, layer)

    def specific_reference(self, point, time_group=None, head=None, image=0, normalize=False, layer=None):
        return self._read("probe", time_group, head, image, normalize, layer, probe=self.probes.index(tuple(point)))


# ----------------------------------------------------------------------------------------------
# Comparison helpers
# ----------------------------------------------------------------------------------------------


class Mismatches:
    """Collects every failing comparison of a test, reported together."""

    def __init__(self):
        self.items = []
        self.count = 0

    def raw(self, actual, expected, what):
        self.count += 1
        if not isinstance(actual, torch.Tensor):
            self.items.append(f"{what}: not a tensor ({type(actual).__name__})")
            return
        if actual.dtype != torch.float32 or tuple(actual.shape) != tuple(expected.shape):
            self.items.append(f"{what}: got {actual.dtype} {tuple(actual.shape)}, want float32 {tuple(expected.shape)}")
            return
        a = actual.detach().double().cpu()
        scale = expected.abs().max().item()
        err = (a - expected).abs()
        bound = RTOL * expected.abs() + RTOL * scale
        if not bool((err <= bound).all()) or not bool(torch.isfinite(a).all()):
            worst = (err - bound).argmax()
            self.items.append(
                f"{what}: max|diff| {err.max().item():.3e} (max|expected| {scale:.3e}, "
                f"rel {err.max().item() / max(scale, 1e-300):.2e}); worst at flat index {int(worst)}: "
                f"got {a.flatten()[worst].item():.6e}, want {expected.flatten()[worst].item():.6e}"
            )

    def normalized(self, actual_norm, actual_raw, what):
        self.count += 1
        if not isinstance(actual_norm, torch.Tensor) or actual_norm.dtype != torch.float32 or actual_norm.shape != actual_raw.shape:
            self.items.append(f"{what}: normalised read has the wrong type/shape: {getattr(actual_norm, 'dtype', None)} "
                              f"{tuple(getattr(actual_norm, 'shape', ()))}")
            return
        n = actual_norm.double()
        raw = actual_raw.double()
        if not bool(torch.isfinite(n).all()) or n.min().item() < -1e-6 or n.max().item() > 1 + 1e-6:
            self.items.append(f"{what}: normalised read outside [0, 1]: [{n.min().item()}, {n.max().item()}]")
            return
        if raw.numel() == 1:
            if n.item() != 0.0:
                self.items.append(f"{what}: normalised 1-cell map is {n.item()}, want 0")
            return
        spread = (raw.max() - raw.min()).item()
        if spread >= NORM_MIN_SPREAD * raw.abs().max().item():
            want = normalize_map(raw)
            err = (n - want).abs().max().item()
            if err > NORM_ATOL:
                self.items.append(f"{what}: normalised read differs from (m-min)/(max-min+1e-8) of the raw read by {err:.3e}")

    def check(self):
        if self.items:
            head = "\n  ".join(self.items[:15])
            more = f"\n  ... and {len(self.items) - 15} more" if len(self.items) > 15 else ""
            raise AssertionError(f"{len(self.items)} of {self.count} comparisons failed:\n  {head}{more}")


def layer_name_map(maps, expected_names):
    """Our layer name (relative to the denoiser) -> the tracer's LayerInfo name (equal, or
    ending in '.' + ours, e.g. with a 'unet.' prefix)."""
    theirs = [info.name for info in maps.layers]
    mapping = {}
    for ours in expected_names:
        hits = [t for t in theirs if t == ours or t.endswith("." + ours)]
        assert len(hits) == 1, f"layer {ours!r}: tracer layers matching it: {hits} (all: {theirs})"
        mapping[ours] = hits[0]
    assert len(theirs) == len(expected_names), f"tracer layers {theirs}, expected {sorted(expected_names)}"
    return mapping


# ----------------------------------------------------------------------------------------------
# Systems, baselines, captures, traced runs (cached per session)
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def system_state(name):
    """(system, untraced output, capture output, capture records); the baseline runs first,
    before any trace touches the model."""
    system = systems.build(name)
    baseline = system.run(seed=0)
    captured, records = capture_run(system, seed=0)
    return system, baseline, captured, records


def soft_mask(h, w):
    """A non-binary mask in [0, 1] with exact 0s and 1s."""
    i = torch.arange(h, dtype=torch.float32)[:, None] / max(h - 1, 1)
    j = torch.arange(w, dtype=torch.float32)[None, :] / max(w - 1, 1)
    return (1.6 * i - 0.3 + 0.4 * torch.sin(6.0 * j)).clamp(0, 1)


@dataclasses.dataclass(frozen=True)
class Scenario:
    cfg: str = "cond"
    time_groups: Optional[int] = None  # None: the trace's default, min(5, steps)
    probes: tuple = ()
    mask: Optional[str] = None  # None | "latent" | "image"
    cfg_layout: Optional[str] = None  # passed only when set (systems may add their own)

    def id(self):
        parts = [self.cfg, f"G{self.time_groups or 5}"]
        if self.probes:
            parts.append(f"{len(self.probes)}probes")
        if self.mask:
            parts.append(f"{self.mask}mask")
        if self.cfg_layout:
            parts.append(self.cfg_layout)
        return "-".join(parts)


def corner_probes(grid):
    h, w = grid
    return ((0, 0), (h - 1, w - 1), (h // 2, w // 3))


SCENARIOS = {
    "paint_by_example": [
        Scenario("cond", 3, corner_probes((10, 6)), "image"),
        Scenario("both"),
        Scenario("uncond", 2, ((3, 4),)),
    ],
    "custom": [
        Scenario("cond", 3, corner_probes((12, 10)), "latent"),
        Scenario("both", None, ((5, 9),)),
        Scenario("uncond", 4),
        Scenario("cond", 2, ((11, 0),), None, "none"),
    ],
    "custom_separate": [
        Scenario("cond", 3, corner_probes((12, 10)), "image"),
        Scenario("both", 2, ((7, 7),)),
        Scenario("uncond", 6),
    ],
    "stableviton": [
        Scenario("cond", 3, corner_probes((13, 10)), "image"),
        Scenario("both", 4, ((12, 0),)),
    ],
    "stableviton_cfg": [
        Scenario("cond", 2, corner_probes((13, 10)), "latent"),
        Scenario("both"),
        Scenario("uncond", 3, ((6, 5),)),
    ],
    "ip_adapter": [
        Scenario("cond", 3, corner_probes((6, 10)), "latent"),
        Scenario("both", None, ((5, 0),)),
        Scenario("uncond", 2),
    ],
}
SYSTEMS = list(SCENARIOS)
CASES = [pytest.param(name, sc, id=f"{name}-{sc.id()}") for name, scs in SCENARIOS.items() for sc in scs]


def scenario_mask(system, scenario):
    if scenario.mask is None:
        return None
    grid = system.latent_grid if scenario.mask == "latent" else system.image_grid()
    return soft_mask(*grid)


def scenario_kwargs(system, scenario):
    kwargs = dict(system.trace_kwargs)
    kwargs["cfg"] = scenario.cfg
    if scenario.time_groups is not None:
        kwargs["time_groups"] = scenario.time_groups
    if scenario.probes:
        kwargs["probes"] = list(scenario.probes)
    mask = scenario_mask(system, scenario)
    if mask is not None:
        kwargs["inpaint_mask"] = mask
    if scenario.cfg_layout is not None:
        kwargs["cfg_layout"] = scenario.cfg_layout
    return kwargs


@functools.lru_cache(maxsize=None)
def traced_case(name, scenario):
    """(system, maps, traced output, baseline, expected)."""
    system, baseline, _, records = system_state(name)
    with trace(system.target, **scenario_kwargs(system, scenario)) as tracer:
        out = system.run(seed=0)
    maps = tracer.maps()
    mask = scenario_mask(system, scenario)
    expected = ExpectedMaps(
        system, records, cfg=scenario.cfg, time_groups=scenario.time_groups or min(5, system.num_steps), probes=scenario.probes,
        inpaint_mask=mask, cfg_layout=scenario.cfg_layout,
    )
    return system, maps, out, baseline, expected


def read_combinations(expected):
    G, heads = expected.G, expected.system.heads
    for image in range(expected.n_images):
        for time_group in sorted({None, 0, G // 2, G - 1}, key=lambda x: -1 if x is None else x):
            for head in (None, 0, heads - 1):
                yield dict(time_group=time_group, head=head, image=image)


# ----------------------------------------------------------------------------------------------
# The capture itself (a check of this file, not of the feature)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SYSTEMS + ["ambiguous"])
def test_capture_reproduces_the_untraced_run(name):
    system, baseline, captured, records = system_state(name)
    assert torch.equal(captured, baseline), "the capturing processors must not change the run"
    layers = set(system.cross_attention_layers())
    recorded = {re.sub(r"\.ip\d+$", "", r.layer) if system.ip_adapter else r.layer for r in records}
    assert recorded == layers
    calls_per_step = 2 if system.cfg_layout == "separate" else 1
    assert len(records) == len(layers) * system.num_steps * calls_per_step
    assert sorted({r.step for r in records}) == list(range(system.num_steps))


# ----------------------------------------------------------------------------------------------
# Outputs unchanged; processors restored
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, scenario", CASES)
def test_output_unchanged(name, scenario):
    system, maps, out, baseline, _ = traced_case(name, scenario)
    assert out.shape == baseline.shape and out.dtype == baseline.dtype == torch.float32
    diff = (out - baseline).abs().max().item()
    assert diff <= OUTPUT_ATOL, f"traced vs untraced output: max|diff| = {diff:.3e} > {OUTPUT_ATOL}"


@pytest.mark.parametrize("name", SYSTEMS)
def test_processors_swapped_inside_and_restored_after(name):
    system = system_state(name)[0]
    before = system.processors()
    cross = set(system.cross_attention_layers())
    assert cross and cross <= set(before)
    with trace(system.target, **system.trace_kwargs):
        during = system.processors()
        for layer, proc in during.items():
            if layer in cross:
                assert proc is not before[layer], f"{layer}: trace did not install its processor"
            else:
                assert proc is before[layer], f"{layer}: not a cross-attention layer, its processor must stay"
        system.run(seed=1)
    after = system.processors()
    assert after.keys() == before.keys()
    for layer in before:
        assert after[layer] is before[layer], f"{layer}: processor not restored"


@pytest.mark.parametrize("name", SYSTEMS)
def test_processors_restored_after_exception(name):
    system = system_state(name)[0]
    before = system.processors()

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with trace(system.target, **system.trace_kwargs):
            system.run(seed=2)
            raise Boom()
    after = system.processors()
    for layer in before:
        assert after[layer] is before[layer], f"{layer}: processor not restored after an exception"
    # and the model can be traced again
    with trace(system.target, **system.trace_kwargs) as tracer:
        system.run(seed=0)
    assert tracer.maps().generated().shape == system.latent_grid


@pytest.mark.parametrize("name", SYSTEMS)
def test_nested_trace_raises(name):
    system = system_state(name)[0]
    before = system.processors()
    with trace(system.target, **system.trace_kwargs) as tracer:
        with pytest.raises((RuntimeError, ValueError)):
            with trace(system.target, **system.trace_kwargs):
                pass
        # the outer trace is intact and still works
        out = system.run(seed=0)
    after = system.processors()
    for layer in before:
        assert after[layer] is before[layer], f"{layer}: processor not restored after a refused nested trace"
    baseline = system_state(name)[1]
    assert (out - baseline).abs().max().item() <= OUTPUT_ATOL
    assert tracer.maps().generated().shape == system.latent_grid


def test_nested_trace_via_the_denoiser_raises():
    """Tracing the pipeline and, inside, its UNet (the same cross-attention modules) is refused."""
    system = system_state("paint_by_example")[0]
    before = system.processors()
    with trace(system.target):
        with pytest.raises((RuntimeError, ValueError)):
            with trace(system.denoiser, num_steps=system.num_steps):
                pass
    after = system.processors()
    assert all(after[k] is before[k] for k in before)


# ----------------------------------------------------------------------------------------------
# Maps against the independent float64 computation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, scenario", CASES)
def test_layers_and_grids(name, scenario):
    system, maps, _, _, expected = traced_case(name, scenario)
    assert tuple(maps.latent_grid) == tuple(system.latent_grid)
    names = layer_name_map(maps, expected.layer_names)
    by_name = {info.name: info for info in maps.layers}
    for ours, theirs in names.items():
        info = by_name[theirs]
        assert tuple(info.generated_grid) == expected.grids[ours], (ours, info)
        assert tuple(info.reference_grid) == expected.ref_grids[ours], (ours, info)
        assert info.reference_offset == expected.offsets[ours], (ours, info)
        assert info.num_keys == expected.num_keys[ours], (ours, info)
        assert info.heads == system.heads, (ours, info)


@pytest.mark.parametrize("name, scenario", CASES)
def test_generated_maps(name, scenario):
    system, maps, _, _, expected = traced_case(name, scenario)
    bad = Mismatches()
    for kw in read_combinations(expected):
        raw = maps.generated(normalize=False, **kw)
        bad.raw(raw, expected.generated(**kw), f"generated({kw})")
        bad.normalized(maps.generated(normalize=True, **kw), raw, f"generated({kw}, normalize=True)")
    # the default call is the normalised time-and-head integrated map of image 0
    bad.normalized(maps.generated(), maps.generated(normalize=False), "generated()")
    bad.check()


@pytest.mark.parametrize("name, scenario", CASES)
def test_reference_maps(name, scenario):
    system, maps, _, _, expected = traced_case(name, scenario)
    bad = Mismatches()
    for kw in read_combinations(expected):
        raw = maps.reference(normalize=False, **kw)
        bad.raw(raw, expected.reference(**kw), f"reference({kw})")
        bad.normalized(maps.reference(normalize=True, **kw), raw, f"reference({kw}, normalize=True)")
    bad.normalized(maps.reference(), maps.reference(normalize=False), "reference()")
    bad.check()


@pytest.mark.parametrize("name, scenario", [c for c in CASES if c.values[1].probes])
def test_specific_reference_maps(name, scenario):
    system, maps, _, _, expected = traced_case(name, scenario)
    bad = Mismatches()
    for point in scenario.probes:
        for kw in read_combinations(expected):
            raw = maps.specific_reference(point, normalize=False, **kw)
            bad.raw(raw, expected.specific_reference(point, **kw), f"specific_reference({point}, {kw})")
            bad.normalized(maps.specific_reference(point, normalize=True, **kw), raw,
                           f"specific_reference({point}, {kw}, normalize=True)")
    bad.check()


@pytest.mark.parametrize("name, scenario", CASES)
def test_per_layer_reads(name, scenario):
    system, maps, _, _, expected = traced_case(name, scenario)
    names = layer_name_map(maps, expected.layer_names)
    G, heads = expected.G, system.heads
    bad = Mismatches()
    for ours, theirs in names.items():
        for kw in (dict(time_group=None, head=None), dict(time_group=G - 1, head=heads - 1),
                   dict(time_group=0, head=None, image=expected.n_images - 1)):
            for kind in ("generated", "reference"):
                raw = getattr(maps, kind)(layer=theirs, normalize=False, **kw)
                bad.raw(raw, getattr(expected, kind)(layer=ours, **kw), f"{kind}(layer={ours}, {kw})")
                bad.normalized(getattr(maps, kind)(layer=theirs, normalize=True, **kw), raw,
                               f"{kind}(layer={ours}, {kw}, normalize=True)")
            for point in scenario.probes:
                raw = maps.specific_reference(point, layer=theirs, normalize=False, **kw)
                bad.raw(raw, expected.specific_reference(point, layer=ours, **kw),
                        f"specific_reference({point}, layer={ours}, {kw})")
    bad.check()


def test_mask_weights_only_the_reference_map():
    """Same run with and without inpaint_mask: generated and specific-reference maps agree,
    the reference map differs (and each equals its own expectation, checked above)."""
    name = "custom"
    system, _, _, records = system_state(name)
    probes = ((3, 3),)
    results = {}
    for mask in (None, soft_mask(*system.latent_grid)):
        kwargs = dict(time_groups=2, probes=list(probes))
        if mask is not None:
            kwargs["inpaint_mask"] = mask
        with trace(system.target, **kwargs) as tracer:
            system.run(seed=0)
        results[mask is not None] = tracer.maps()
    plain, masked = results[False], results[True]
    for image in range(system.n_images):
        for fn in ("generated",):
            a = getattr(plain, fn)(image=image, normalize=False)
            b = getattr(masked, fn)(image=image, normalize=False)
            torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * a.abs().max().item())
        a = plain.specific_reference(probes[0], image=image, normalize=False)
        b = masked.specific_reference(probes[0], image=image, normalize=False)
        torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * a.abs().max().item())
        a = plain.reference(image=image, normalize=False)
        b = masked.reference(image=image, normalize=False)
        assert (a - b).abs().max().item() > 1e-3 * a.abs().max().item(), "the mask did not weight the reference map"
        exp = ExpectedMaps(system, records, time_groups=2, probes=probes, inpaint_mask=soft_mask(*system.latent_grid))
        bad = Mismatches()
        bad.raw(b, exp.reference(image=image), f"masked reference(image={image})")
        bad.check()


def test_latent_and_image_sized_masks():
    """A latent-sized mask and an image-sized one (latent x vae_scale_factor, here the same
    mask upsampled 8x): each is resized straight to every layer grid (bilinear, antialiased)
    and weights that layer's reference map."""
    name = "ip_adapter"
    system, _, _, records = system_state(name)
    h, w = system.latent_grid
    s = system.image_scale
    latent_mask = soft_mask(h, w)
    image_mask = latent_mask.repeat_interleave(s, 0).repeat_interleave(s, 1)
    bad = Mismatches()
    for mask in (latent_mask, image_mask):
        with trace(system.target, inpaint_mask=mask, time_groups=1) as tracer:
            system.run(seed=0)
        maps = tracer.maps()
        exp = ExpectedMaps(system, records, time_groups=1, inpaint_mask=mask)
        names = layer_name_map(maps, exp.layer_names)
        bad.raw(maps.reference(normalize=False), exp.reference(), f"reference() with {tuple(mask.shape)} mask")
        for ours, theirs in names.items():
            bad.raw(maps.reference(layer=theirs, normalize=False), exp.reference(layer=ours),
                    f"reference(layer={ours}) with {tuple(mask.shape)} mask")
    bad.check()


def test_layers_predicate_and_finest_reference_grid():
    """layers=predicate: only those layers are traced and averaged; the reference maps' common
    grid is the finest among the TRACED layers (7x5 once the 13x10 layer is left out)."""
    name = "stableviton"
    system, baseline, _, records = system_state(name)
    keep = {"attn1", "attn2"}
    with trace(system.target, layers=lambda layer, module: layer.split(".")[-1] in keep, time_groups=2,
               probes=[(4, 4)], **system.trace_kwargs) as tracer:
        out = system.run(seed=0)
    assert (out - baseline).abs().max().item() <= OUTPUT_ATOL
    maps = tracer.maps()
    exp = ExpectedMaps(system, records, time_groups=2, probes=((4, 4),), layers=keep)
    assert exp.finest_ref == (7, 5)
    layer_name_map(maps, exp.layer_names)
    bad = Mismatches()
    for kw in read_combinations(exp):
        bad.raw(maps.generated(normalize=False, **kw), exp.generated(**kw), f"generated({kw})")
        bad.raw(maps.reference(normalize=False, **kw), exp.reference(**kw), f"reference({kw})")
        bad.raw(maps.specific_reference((4, 4), normalize=False, **kw), exp.specific_reference((4, 4), **kw),
                f"specific_reference({kw})")
    bad.check()


def test_layers_by_exact_name_pattern():
    name = "custom"
    system, _, _, records = system_state(name)
    only = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    with trace(system.target, layers=[only], time_groups=1) as tracer:
        system.run(seed=0)
    maps = tracer.maps()
    exp = ExpectedMaps(system, records, time_groups=1, layers={only})
    names = layer_name_map(maps, [only])
    bad = Mismatches()
    bad.raw(maps.generated(normalize=False), exp.generated(), "generated()")
    bad.raw(maps.reference(normalize=False), exp.reference(), "reference()")
    bad.raw(maps.generated(layer=names[only], normalize=False), exp.generated(layer=only), "generated(layer)")
    bad.check()


@pytest.mark.parametrize("how", ["tuple", "callable"])
def test_explicit_reference_grid(how):
    """7 context tokens: reference_grid=(2, 3) (the last 6 tokens; one leading token off the
    grid), given as a tuple or as a callable (layer_name, num_keys, generated_grid) -> (h, w)."""
    system, baseline, _, records = system_state("ambiguous")
    seen = []

    def grid_fn(layer, num_keys, generated_grid):
        seen.append((layer, num_keys, tuple(generated_grid)))
        return (2, 3)

    grid = (2, 3) if how == "tuple" else grid_fn
    with trace(system.target, reference_grid=grid, time_groups=2, probes=[(7, 5)], **system.trace_kwargs) as tracer:
        out = system.run(seed=0)
    assert (out - baseline).abs().max().item() <= OUTPUT_ATOL
    maps = tracer.maps()
    exp = ExpectedMaps(system, records, time_groups=2, probes=((7, 5),))
    names = layer_name_map(maps, exp.layer_names)
    if how == "callable":
        assert seen, "the reference_grid callable was never called"
        for layer, num_keys, generated_grid in seen:
            ours = [o for o, t in names.items() if t == layer or layer == o]
            assert ours, f"callable got layer name {layer!r}, not one of {list(names.values())}"
            assert num_keys == 7 and generated_grid == system.layer_grid(ours[0])
    by_name = {info.name: info for info in maps.layers}
    for ours, theirs in names.items():
        assert tuple(by_name[theirs].reference_grid) == (2, 3) and by_name[theirs].reference_offset == 1
    bad = Mismatches()
    for kw in read_combinations(exp):
        bad.raw(maps.generated(normalize=False, **kw), exp.generated(**kw), f"generated({kw})")
        bad.raw(maps.reference(normalize=False, **kw), exp.reference(**kw), f"reference({kw})")
        bad.raw(maps.specific_reference((7, 5), normalize=False, **kw), exp.specific_reference((7, 5), **kw),
                f"specific_reference({kw})")
    for ours, theirs in names.items():
        bad.raw(maps.reference(layer=theirs, normalize=False), exp.reference(layer=ours), f"reference(layer={ours})")
    bad.check()


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SYSTEMS)
def test_save_load_round_trip(name, tmp_path):
    scenario = SCENARIOS[name][0]
    system, maps, _, _, expected = traced_case(name, scenario)
    path = tmp_path / "maps.safetensors"
    maps.save(str(path))
    loaded = i2am_fast.AttributionMaps.load(str(path))
    assert isinstance(loaded, i2am_fast.AttributionMaps)
    assert tuple(loaded.latent_grid) == tuple(maps.latent_grid)
    fields = ("name", "generated_grid", "reference_grid", "reference_offset", "heads", "num_keys")

    def info(layers):
        return [tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in (getattr(x, f) for f in fields)) for x in layers]

    assert info(loaded.layers) == info(maps.layers)
    layer_names = [info.name for info in maps.layers]
    for kw in read_combinations(expected):
        for normalize in (False, True):
            for fn in ("generated", "reference"):
                a = getattr(maps, fn)(normalize=normalize, **kw)
                b = getattr(loaded, fn)(normalize=normalize, **kw)
                assert torch.equal(a, b), f"{fn}({kw}, normalize={normalize}) changed by save/load"
            for point in scenario.probes:
                a = maps.specific_reference(point, normalize=normalize, **kw)
                b = loaded.specific_reference(point, normalize=normalize, **kw)
                assert torch.equal(a, b), f"specific_reference({point}, {kw}) changed by save/load"
    for layer in layer_names:
        for fn in ("generated", "reference"):
            assert torch.equal(getattr(maps, fn)(layer=layer), getattr(loaded, fn)(layer=layer))
            assert torch.equal(getattr(maps, fn)(layer=layer, normalize=False, time_group=0, head=1),
                               getattr(loaded, fn)(layer=layer, normalize=False, time_group=0, head=1))


# ----------------------------------------------------------------------------------------------
# Bad inputs: clear errors that say what to pass
# ----------------------------------------------------------------------------------------------


def run_expecting_error(system, match, **kwargs):
    """The error may come from trace() itself, entering it, or the first traced call; either
    way the processors must be the originals afterwards."""
    before = system.processors()
    try:
        with pytest.raises(BAD_INPUT, match=match):
            with trace(system.target, **kwargs):
                system.run(seed=0)
    finally:
        after = system.processors()
        restored = all(after[k] is before[k] for k in before)
        for k, attn in ((k, m) for k, m in system.denoiser.named_modules() if k in before):
            attn.set_processor(before[k])  # protect the other tests either way
    assert restored, "processors not restored after a failing traced run"


@pytest.mark.parametrize("point", [(12, 0), (0, 10), (-1, 3), (100, 100)])
def test_probe_off_the_grid(point):
    system = system_state("custom")[0]
    run_expecting_error(system, r"(?i)probe", probes=[point])


@pytest.mark.parametrize("shape", [(5, 5), (12, 11), (1, 12, 10, 2), (95, 80)])
def test_inpaint_mask_wrong_size(shape):
    system = system_state("custom")[0]
    run_expecting_error(system, r"inpaint_mask", inpaint_mask=torch.ones(shape))


@pytest.mark.parametrize("bad_value", [1.5, -0.25, float("nan")])
def test_inpaint_mask_values_outside_unit_interval(bad_value):
    system = system_state("custom")[0]
    mask = soft_mask(*system.latent_grid)
    mask[2, 3] = bad_value
    run_expecting_error(system, r"inpaint_mask", inpaint_mask=mask)


@pytest.mark.parametrize("grid", [(5, 5), (3, 7), (0, 4)])
def test_reference_grid_that_does_not_fit_the_tokens(grid):
    system = system_state("custom")[0]  # 17 tokens
    run_expecting_error(system, r"reference_grid", reference_grid=grid)


def test_reference_grid_callable_that_does_not_fit():
    system = system_state("custom")[0]
    run_expecting_error(system, r"reference_grid", reference_grid=lambda layer, nk, grid: (5, 5))


def test_ambiguous_grid_needs_reference_grid():
    system = system_state("ambiguous")[0]  # 7 tokens
    run_expecting_error(system, r"reference_grid", **system.trace_kwargs)


@pytest.mark.parametrize("cfg", ["conditional", "COND", None, ""])
def test_bad_cfg_value(cfg):
    system = system_state("custom")[0]
    run_expecting_error(system, r"cfg", cfg=cfg)


def test_uncond_without_guidance_halves():
    system = system_state("stableviton")[0]  # a plain batch of different latents
    run_expecting_error(system, r"(?i)cfg|uncond|guidance|halves|doubled", cfg="uncond", **system.trace_kwargs)


def test_bare_module_needs_num_steps():
    system = system_state("stableviton")[0]
    run_expecting_error(system, r"num_steps")


@pytest.mark.parametrize("module", [nn.Linear(4, 4), nn.Sequential(nn.Conv2d(3, 3, 1)), "selfattn"])
def test_no_cross_attention_found(module):
    if module == "selfattn":  # diffusers Attention modules, but self-attention only
        from diffusers.models.attention_processor import Attention

        module = nn.Sequential(Attention(query_dim=8, heads=2, dim_head=4))
    with pytest.raises(BAD_INPUT, match=r"(?i)cross.?attention"):
        with trace(module, num_steps=1):
            pass


def test_no_cross_attention_in_pipeline_like_object():
    class NotAPipeline:
        unet = nn.Linear(3, 3)

    with pytest.raises(BAD_INPUT, match=r"(?i)cross.?attention"):
        with trace(NotAPipeline(), num_steps=1):
            pass


@pytest.fixture(scope="module")
def custom_maps():
    system, maps, _, _, expected = traced_case("custom", SCENARIOS["custom"][0])
    return maps, expected


@pytest.mark.parametrize("reader", ["generated", "reference", "specific_reference"])
def test_read_errors(custom_maps, reader):
    maps, expected = custom_maps
    G, H, I = expected.G, expected.system.heads, expected.n_images
    point = expected.probes[0]

    def read(**kw):
        if reader == "specific_reference":
            return maps.specific_reference(point, **kw)
        return getattr(maps, reader)(**kw)

    read(time_group=G - 1, head=H - 1, image=I - 1)  # the last valid indices work
    for bad in (G, G + 3):
        with pytest.raises(BAD_INPUT, match="time_group"):
            read(time_group=bad)
    with pytest.raises(BAD_INPUT, match="head"):
        read(head=H)
    with pytest.raises(BAD_INPUT, match="image"):
        read(image=I)
    with pytest.raises(BAD_INPUT, match="layer"):
        read(layer="no.such.layer")


def test_specific_reference_for_a_point_not_probed(custom_maps):
    maps, expected = custom_maps
    assert (1, 1) not in expected.probes
    with pytest.raises(BAD_INPUT, match=r"(?i)probe"):
        maps.specific_reference((1, 1))


def test_specific_reference_without_probes():
    system, maps, _, _, _ = traced_case("custom", SCENARIOS["custom"][2])  # no probes
    with pytest.raises(BAD_INPUT, match=r"(?i)probe"):
        maps.specific_reference((0, 0))
