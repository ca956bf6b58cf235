"""Tiny random-weight try-on systems wired the way their authors publish them.

Nothing is downloaded; every weight is seeded. Four families (ten variants in ``BUILDERS``):

1. ``stableviton_like()``: CompVis ``ldm`` code. A ``UNetModel`` subclass whose decoder blocks
   (all but the lowest level's) are preceded by a "warping" ``SpatialTransformer`` whose
   cross-attention reads the clothing encoder's feature map at the block's own resolution
   (``Nk == Nq``), followed by a 1x1 conv and a residual; the clothing encoder is the UNet's
   encoder half with the cloth latent added after its first block. The UNet's own
   ``SpatialTransformer`` blocks cross-attend to one CLIP-image token. Sampled with ``ldm``'s
   own ``DDIMSampler``; guidance as one doubled batch ``[uncond, cond]`` whose halves differ only
   in that token (a learned vector); the cloth latent is the same in both halves (the cloth
   features are not: the encoder cross-attends to the token too). ``sampler="plms"`` follows the
   released inference script instead: PLMS, two calls per model evaluation with the conditional
   one first, and two evaluations in the first step.
2. ``dci_like()``: ``ldm`` ``UNetModel`` with 9 input channels (noisy, masked-person latent,
   mask) cross-attending to one CLIP-image token (Paint-by-Example style), ``DDIMSampler``,
   unconditional token = a learned vector.
3. ``idm_like()``: a diffusers ``UNet2DConditionModel`` (13 input channels) and a reference
   ("garment") UNet of the same layout. Each transformer block of the reference UNet records the
   input of its ``attn1``; the try-on UNet's block appends those tokens to its own before a stock
   ``attn1`` processor (``[own ; garment]`` as queries and keys, the output keeps the own half).
   ``appending="processor"`` instead leaves the blocks stock and appends the garment tokens to
   the keys inside a custom ``attn1`` processor (queries: own tokens only). Guidance: doubled
   batch; the unconditional half gets zero garment features and a different text embedding.
4. ``catvton_like()``: a 9-channel diffusers inpainting UNet whose cross-attention processors
   return their input (cross-attention removed), person and garment in one latent stacked by
   height (``2h x w``) or side by side (``h x 2w``); the unconditional half zeroes the garment in
   the masked-latent channels, so the two halves of the UNet input differ.

Each builder returns a ``TryOnSystem`` (see its fields): the object to trace, the denoiser and
how it is called, ``run(seed)``, the step schedule, the guidance batching, and for every attention
layer a tracer should map, its ``TokenLayout`` (which queries are generated tokens on which grid,
which keys are reference tokens on which grid). ``python tests/tryon_systems.py`` is a smoke run.

``ldm`` comes from the ``stable-diffusion-sdkit`` package, installed without its dependencies
(tests only: ``pip install --no-deps -r requirements-ldm.txt``; see requirements-dev.txt).
Its ``MemoryEfficientCrossAttention`` calls ``xformers.ops.memory_efficient_attention``, which is
not installed; ``attention="xformers"`` builds with that class and runs it through
``xformers_stand_in()``, a scaled-dot-product stand-in for that one function.
"""

from __future__ import annotations

import contextlib
import io
import types
from typing import Callable, Optional

import torch
import torch.nn as nn

from tryon_common import Tokens, TokenLayout, TracedLayer, TryOnSystem, halve, quiet, seeded, unzero
from tryon_diffusers import catvton_like, idm_like

# ----------------------------------------------------------------------------------------------
# ldm pieces
# ----------------------------------------------------------------------------------------------


def _memory_efficient_attention(q, k, v, attn_bias=None, op=None):
    """xformers' ``memory_efficient_attention`` for [B, N, D] inputs without a bias: softmax with
    the default scale 1/sqrt(D)."""
    if attn_bias is not None:
        raise NotImplementedError("the stand-in takes no attention bias")
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


@contextlib.contextmanager
def xformers_stand_in():
    """Give ``ldm.modules.attention`` an ``xformers`` name whose ``ops.memory_efficient_attention``
    is plain scaled-dot-product attention, for the duration of the block."""
    import ldm.modules.attention as attention

    had = hasattr(attention, "xformers")
    saved = getattr(attention, "xformers", None)
    attention.xformers = types.SimpleNamespace(ops=types.SimpleNamespace(memory_efficient_attention=_memory_efficient_attention))
    try:
        yield
    finally:
        if had:
            attention.xformers = saved
        else:
            del attention.xformers


@contextlib.contextmanager
def _ldm_attention_class(kind: str):
    """Build ``ldm`` transformer blocks with ``CrossAttention`` ("softmax") or
    ``MemoryEfficientCrossAttention`` ("xformers"): BasicTransformerBlock picks the class from
    the module flag ``XFORMERS_IS_AVAILBLE`` at construction."""
    import ldm.modules.attention as attention

    if kind not in ("softmax", "xformers"):
        raise ValueError(f"attention must be 'softmax' or 'xformers', got {kind!r}")
    saved = attention.XFORMERS_IS_AVAILBLE
    attention.XFORMERS_IS_AVAILBLE = kind == "xformers"
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # MemoryEfficientCrossAttention prints on construction
            yield
    finally:
        attention.XFORMERS_IS_AVAILBLE = saved


def ldm_attention_modules(module: nn.Module) -> dict[str, nn.Module]:
    from ldm.modules.attention import CrossAttention, MemoryEfficientCrossAttention

    return {n: m for n, m in module.named_modules() if isinstance(m, (CrossAttention, MemoryEfficientCrossAttention))}


def ldm_unet_levels(unet) -> dict[str, int]:
    """Prefix of each input/middle/output block of an ldm ``UNetModel`` -> how many times the
    latent grid is halved there (counted from its Downsample/Upsample modules)."""
    from ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    levels, level = {}, 0
    for i, block in enumerate(unet.input_blocks):
        levels[f"input_blocks.{i}."] = level  # the block's attention runs before its own Downsample (none in ldm)
        level += sum(isinstance(m, Downsample) for m in block.modules())
    levels["middle_block."] = level
    for i, block in enumerate(unet.output_blocks):
        levels[f"output_blocks.{i}."] = level  # attention precedes the block's Upsample
        level -= sum(isinstance(m, Upsample) for m in block.modules())
    return levels


def _ldm_unet_kwargs(in_channels, channel_mult, context_dim, heads=2, model_channels=32):
    return dict(
        image_size=16,  # unused by UNetModel
        in_channels=in_channels,
        model_channels=model_channels,
        out_channels=4,
        num_res_blocks=1,
        attention_resolutions=[1, 2],
        channel_mult=channel_mult,
        num_heads=heads,
        use_spatial_transformer=True,
        transformer_depth=1,
        context_dim=context_dim,
        use_checkpoint=True,  # as in both projects' configs: ldm's CheckpointFunction wraps each block
        legacy=False,
    )


class TinyLatentDiffusion(nn.Module):
    """What ldm's samplers read from a ``LatentDiffusion`` (``ldm.models.diffusion.ddpm`` needs
    pytorch_lightning): ``num_timesteps``, ``betas``, ``alphas_cumprod(_prev)``, ``device``,
    ``parameterization``, ``apply_model(x_noisy, t, cond)``; ``model.diffusion_model`` is the
    UNet, as in ldm. Linear beta schedule 0.00085..0.012 over 1000 steps (both projects)."""

    def __init__(self, diffusion_model: nn.Module, call_style: str):
        super().__init__()
        from ldm.modules.diffusionmodules.util import make_beta_schedule

        if call_style not in ("ldm_wrapper", "ldm_positional", "ldm_keywords"):
            raise ValueError(f"call_style must be an ldm style, got {call_style!r}")
        self.model = nn.Module()
        self.model.diffusion_model = diffusion_model
        self.call_style = call_style
        self.num_timesteps = 1000
        self.parameterization = "eps"
        betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)  # numpy float64
        alphas_cumprod = (1.0 - betas).cumprod()
        f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        self.register_buffer("betas", f32(betas))
        self.register_buffer("alphas_cumprod", f32(alphas_cumprod))
        self.register_buffer("alphas_cumprod_prev", f32([1.0, *alphas_cumprod[:-1]]))

    @property
    def device(self):
        return self.betas.device

    def q_sample(self, x0, t: int, noise):
        a = self.alphas_cumprod[t]
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def call_unet(self, x, t, context, **extra):
        unet = self.model.diffusion_model
        if self.call_style == "ldm_wrapper":
            return unet(x, t, context=context, **extra)
        if self.call_style == "ldm_positional":
            return unet(x, t, context, *extra.values())
        return unet(x=x, timesteps=t, context=context, **extra)


def ldm_ddim(model: TinyLatentDiffusion):
    from ldm.models.diffusion.ddim import DDIMSampler

    return DDIMSampler(model)


def ldm_schedule(sampler, num_steps: int) -> list[int]:
    """The timesteps an ldm DDIMSampler visits, in calling order: ``np.flip(ddim_timesteps)``
    (``make_schedule`` sets ``ddim_timesteps``; its length can exceed ``num_steps``)."""
    with quiet():
        sampler.make_schedule(ddim_num_steps=num_steps, ddim_eta=0.0, verbose=False)
    return [int(t) for t in sampler.ddim_timesteps[::-1]]


def _ldm_layers(unet, latent_grid, layouts: Callable[[str, nn.Module, tuple[int, int]], Optional[tuple[str, TokenLayout]]]):
    levels = ldm_unet_levels(unet)
    out = {}
    for name, module in ldm_attention_modules(unet).items():
        prefix = next((p for p in levels if name.startswith(p)), None)
        grid = halve(latent_grid, levels[prefix]) if prefix is not None else None
        got = layouts(name, module, grid)
        if got is not None:
            role, layout = got
            out[name] = TracedLayer(name, module, "ldm", role, layout)
    return out


# ----------------------------------------------------------------------------------------------
# 1. StableVITON-like
# ----------------------------------------------------------------------------------------------


def _ldm_channels(model_channels, channel_mult, num_res_blocks):
    """Channels of each input block's output (ldm's construction order), and of each output
    block's output."""
    enc = [model_channels]
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            enc.append(mult * model_channels)
        if level != len(channel_mult) - 1:
            enc.append(mult * model_channels)
    dec = [mult * model_channels for mult in reversed(channel_mult) for _ in range(num_res_blocks + 1)]
    return enc, dec


def _stableviton_classes():
    from einops import rearrange
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential, UNetModel
    from ldm.modules.diffusionmodules.util import conv_nd, timestep_embedding, zero_module

    class ClothEncoder(UNetModel):
        """StableVITON's clothing encoder at small scale: the UNet's encoder half (input blocks and
        middle block); the cloth latent enters through a zero-initialised conv added after the
        first input block. Returns every input block's output and the middle block's."""

        def __init__(self, hint_channels, **kwargs):
            super().__init__(**kwargs)
            self.output_blocks = nn.ModuleList()
            self.out = nn.Identity()
            self.cond_first_block = TimestepEmbedSequential(
                zero_module(conv_nd(2, hint_channels, self.model_channels, 3, padding=1))
            )

        def forward(self, x, hint, timesteps, context, **kwargs):
            emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, repeat_only=False))
            guided = self.cond_first_block(hint, emb, context)
            feats, h = [], x
            for i, block in enumerate(self.input_blocks):
                h = block(h, emb, context)
                if i == 0:
                    h = h + guided
                feats.append(h)
            feats.append(self.middle_block(h, emb, context))
            return feats

    class WarpingUNet(UNetModel):
        """StableVITON's UNet at small scale: before every decoder block except those of the
        lowest level, a SpatialTransformer ("warp block") whose cross-attention context is the
        clothing encoder's feature map of the matching skip position (same grid as the decoder
        block's input), then a zero-initialised 1x1 conv, added to the input.

        ``forward(x, timesteps=None, context=None, control=None)``; ``control`` is the encoder's
        feature list; it is consumed from the end, the middle feature first (unused)."""

        def __init__(self, control_channels: list[int], **kwargs):
            super().__init__(**kwargs)
            _, dec = _ldm_channels(self.model_channels, self.channel_mult, self.num_res_blocks[0])
            self.first_warped = self.num_res_blocks[-1] + 1  # the lowest level's decoder blocks are not warped
            h_in = [self.model_channels * self.channel_mult[-1]] + dec[:-1]  # channels entering each decoder block
            blocks, convs = [], []
            for j in range(self.first_warped, len(self.output_blocks)):
                in_ch, ctx_ch = h_in[j], control_channels[-2 - j]
                blocks.append(
                    SpatialTransformer(
                        in_ch, self.num_heads, in_ch // self.num_heads, depth=1, context_dim=ctx_ch,
                        use_linear=False, use_checkpoint=True,
                    )
                )
                convs.append(zero_module(conv_nd(2, in_ch, in_ch, 1, padding=0)))
            self.warp_flow_blks = nn.ModuleList(blocks)
            self.warp_zero_convs = nn.ModuleList(convs)

        def forward(self, x, timesteps=None, context=None, control=None, **kwargs):
            emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, repeat_only=False))
            skips, h = [], x
            for block in self.input_blocks:
                h = block(h, emb, context)
                skips.append(h)
            h = self.middle_block(h, emb, context)
            control = list(control)
            control.pop()  # the middle block's feature
            for j, block in enumerate(self.output_blocks):
                feature = control.pop()
                if j >= self.first_warped:
                    i = j - self.first_warped
                    out = self.warp_flow_blks[i](h, rearrange(feature, "b c h w -> b (h w) c").contiguous())
                    h = self.warp_zero_convs[i](out) + h
                h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
            return self.out(h)

    return ClothEncoder, WarpingUNet


class StableVitonLDM(TinyLatentDiffusion):
    """ControlLDM-like: ``cond`` = {"c_crossattn": [CLIP token], "c_concat": [cloth latent],
    "first_stage_cond": agnostic + mask + densepose latents}; apply_model concatenates the
    first-stage condition to the noisy latent (13 channels), runs the clothing encoder, then the
    UNet with the encoder's features as ``control``."""

    def __init__(self, diffusion_model, control_model, call_style, context_dim):
        super().__init__(diffusion_model, call_style)
        self.control_model = control_model
        self.learnable_vector = nn.Parameter(torch.randn(1, 1, context_dim))  # the unconditional token

    def apply_model(self, x_noisy, t, cond):
        x = torch.cat([x_noisy, cond["first_stage_cond"]], dim=1)
        context = torch.cat(cond["c_crossattn"], dim=1)
        hint = torch.cat(cond["c_concat"], dim=1)
        control = self.control_model(x=x, hint=hint, timesteps=t, context=context)
        return self.call_unet(x, t, context, control=control)


def plms_cond_first(model, sampler, num_steps, x_T, cond, uncond, guidance_scale):
    """The calling pattern of StableVITON's released inference sampler (PLMS): guidance as two
    ``apply_model`` calls per model evaluation, the conditional one first; the first step
    evaluates the model twice, at its timestep and at the next one (pseudo improved Euler), then
    linear multistep with the stored noise predictions. Uses the DDIM sampler's alphas."""
    with quiet():
        sampler.make_schedule(ddim_num_steps=num_steps, ddim_eta=0.0, verbose=False)
    times = [int(t) for t in sampler.ddim_timesteps[::-1]]
    alphas = [float(a) for a in sampler.ddim_alphas]
    alphas_prev = [float(a) for a in sampler.ddim_alphas_prev]
    b, total, x, old = x_T.shape[0], len(times), x_T, []

    def eps(x, t):
        ts = torch.full((b,), t, dtype=torch.long)
        e_cond = model.apply_model(x, ts, cond)
        e_uncond = model.apply_model(x, ts, uncond)
        return e_uncond + guidance_scale * (e_cond - e_uncond)

    def ddim_step(x, e, index):
        a, a_prev = alphas[index], alphas_prev[index]
        x0 = (x - (1 - a) ** 0.5 * e) / a**0.5
        return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * e

    for i, t in enumerate(times):
        index = total - i - 1
        e = eps(x, t)
        if not old:
            e_prime = (e + eps(ddim_step(x, e, index), times[min(i + 1, total - 1)])) / 2
        elif len(old) == 1:
            e_prime = (3 * e - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x = ddim_step(x, e_prime, index)
        old = (old + [e])[-3:]
    return x


def stableviton_like(
    latent_grid=(8, 12), num_steps: int = 2, num_images: int = 1, attention: str = "xformers",
    call_style: str = "ldm_keywords", sampler: str = "ddim", guidance_scale: float = 5.0, seed: int = 0,
) -> TryOnSystem:
    """StableVITON at small scale (3 levels, 32/64/64 channels, 2 heads; latent 8x12 -> 4x6 ->
    2x3). ``attention="xformers"`` (default; StableVITON's own ldm passes ``hint=`` to ``attn1``,
    which only MemoryEfficientCrossAttention accepts, so its released code runs with xformers)
    or ``"softmax"`` (CrossAttention). ``call_style``: "ldm_keywords" (as ControlLDM calls it) or
    "ldm_positional". ``sampler``: "ddim" (ldm's DDIMSampler, guidance as one doubled batch) or
    "plms" (the released inference script's pattern: ``plms_cond_first``)."""
    if sampler not in ("ddim", "plms"):
        raise ValueError(f"sampler must be 'ddim' or 'plms', got {sampler!r}")
    kind = sampler
    ClothEncoder, WarpingUNet = _stableviton_classes()
    context_dim, hint_channels = 16, 4
    channel_mult = (1, 2, 2)
    kwargs = _ldm_unet_kwargs(in_channels=13, channel_mult=channel_mult, context_dim=context_dim)
    enc, _ = _ldm_channels(32, channel_mult, 1)
    with seeded(seed), _ldm_attention_class(attention):
        unet = WarpingUNet(control_channels=enc + [enc[-1]], **kwargs).eval()
        encoder = ClothEncoder(hint_channels=hint_channels, **kwargs).eval()
        model = StableVitonLDM(unet, encoder, call_style, context_dim).eval()
        unzero(model)
    sampler = ldm_ddim(model)
    timesteps = ldm_schedule(sampler, num_steps)
    h, w = latent_grid
    n = num_images

    @torch.no_grad()
    def run(seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        person = torch.randn(n, 4, h, w, generator=g)  # the person image's latent (start code)
        agnostic = torch.randn(n, 4, h, w, generator=g)
        agnostic_mask = (torch.rand(n, 1, h, w, generator=g) > 0.5).float()
        densepose = torch.randn(n, 4, h, w, generator=g)
        cloth = torch.randn(n, hint_channels, h, w, generator=g)  # the cloth latent
        clip_token = torch.randn(n, 1, context_dim, generator=g)  # the cloth's CLIP image embedding
        x_T = model.q_sample(person, 999, torch.randn(n, 4, h, w, generator=g))
        first = torch.cat([agnostic, agnostic_mask, densepose], dim=1)
        cond = {"c_crossattn": [clip_token], "c_concat": [cloth], "first_stage_cond": first}
        uncond = {"c_crossattn": [model.learnable_vector.repeat(n, 1, 1)], "c_concat": [cloth], "first_stage_cond": first}
        with seeded(seed), quiet(), (xformers_stand_in() if attention == "xformers" else contextlib.nullcontext()):
            if kind == "plms":
                return plms_cond_first(model, sampler, num_steps, x_T, cond, uncond, guidance_scale).float()
            samples, _ = sampler.sample(
                num_steps, n, (4, h, w), cond, x_T=x_T, verbose=False, eta=0.0,
                unconditional_guidance_scale=guidance_scale, unconditional_conditioning=uncond,
            )
        return samples.float()

    def layouts(name, module, grid):
        if name.startswith("warp_flow_blks.") and name.endswith("attn2"):
            i = int(name.split(".")[1])
            level = ldm_unet_levels(unet)[f"output_blocks.{i + unet.first_warped}."]
            g = halve(latent_grid, level)
            nq = g[0] * g[1]
            return "warp", TokenLayout("cross", "cloth", nq, nq, Tokens.block(g), Tokens.block(g))
        if name.endswith("attn2"):
            nq = grid[0] * grid[1]
            return "clip-token", TokenLayout("cross", "clip", nq, 1, Tokens.block(grid), Tokens.block((1, 1)))
        return None  # attn1: self-attention

    if kind == "plms":  # step 0 also evaluates at step 1's timestep
        pairs = [0, 1] + list(range(1, len(timesteps)))
        expected = [(s, half) for s in pairs for half in ("cond", "uncond")]
    else:
        expected = None
    return TryOnSystem(
        name=f"stableviton_{attention}_{call_style}_{kind}",
        expected_calls=expected,
        target=model,
        denoiser=unet,
        denoiser_call=call_style,
        run=run,
        latent_grid=tuple(latent_grid),
        num_steps=len(timesteps),
        timesteps=timesteps,
        schedule="ldm DDIMSampler: ddim_timesteps (ascending numpy array, +1 offset) visited as np.flip(ddim_timesteps); "
        "the UNet gets a 1-D long tensor torch.full((batch,), t)",
        n_images=n,
        cfg="doubled" if kind == "ddim" else "separate_cond_first",
        halves="context only: c_crossattn = learnable vector (uncond) vs CLIP token (cond); x, cloth hint and "
        "first-stage condition identical",
        layers=_ldm_layers(unet, latent_grid, layouts),
        sampler=sampler,
        auxiliary={"control_model": encoder},
        notes="the clothing encoder (control_model) runs before each UNet call, with the same x, t and context, "
        "and has its own SpatialTransformers (not traced)",
    )


# ----------------------------------------------------------------------------------------------
# 2. DCI-VTON-like
# ----------------------------------------------------------------------------------------------


class DciLDM(TinyLatentDiffusion):
    """LatentTryOnDiffusion-like: ``cond`` = {"c_concat": [masked-person latent, mask],
    "c_crossattn": [CLIP token]}; ``diffusion_model(cat([x] + c_concat), t, context=cc)``."""

    def __init__(self, diffusion_model, call_style, embed_dim, context_dim):
        super().__init__(diffusion_model, call_style)
        self.proj_out = nn.Linear(embed_dim, context_dim)  # CLIP image embedding -> context token
        self.learnable_vector = nn.Parameter(torch.randn(1, 1, context_dim))

    def apply_model(self, x_noisy, t, cond):
        x = torch.cat([x_noisy, *cond["c_concat"]], dim=1)
        return self.call_unet(x, t, torch.cat(cond["c_crossattn"], dim=1))


def dci_like(
    latent_grid=(10, 6), num_steps: int = 2, num_images: int = 2, attention: str = "softmax",
    call_style: str = "ldm_wrapper", guidance_scale: float = 4.0, seed: int = 0,
) -> TryOnSystem:
    """DCI-VTON at small scale: 9-channel ldm UNet (2 levels, 32/64 channels, 2 heads; latent
    10x6 -> 5x3), one context token, two images per run."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    embed_dim, context_dim = 24, 16
    with seeded(seed), _ldm_attention_class(attention):
        unet = UNetModel(**_ldm_unet_kwargs(in_channels=9, channel_mult=(1, 2), context_dim=context_dim)).eval()
        model = DciLDM(unet, call_style, embed_dim, context_dim).eval()
        unzero(model)
    sampler = ldm_ddim(model)
    timesteps = ldm_schedule(sampler, num_steps)
    h, w = latent_grid
    n = num_images

    @torch.no_grad()
    def run(seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        warped_cloth = torch.randn(n, 4, h, w, generator=g)  # latent of the warped garment (start code)
        inpaint = torch.randn(n, 4, h, w, generator=g)  # latent of the masked person
        mask = torch.zeros(n, 1, h, w)
        mask[:, :, h // 4 : (3 * h) // 4, w // 4 : (3 * w) // 4] = 1.0
        clip_embed = torch.randn(n, 1, embed_dim, generator=g)
        c = model.proj_out(clip_embed)
        x_T = model.q_sample(warped_cloth, 999, torch.randn(n, 4, h, w, generator=g))
        cond = {"c_concat": [inpaint, mask], "c_crossattn": [c]}
        uncond = {"c_concat": [inpaint, mask], "c_crossattn": [model.learnable_vector.repeat(n, 1, 1)]}
        with seeded(seed), quiet(), (xformers_stand_in() if attention == "xformers" else contextlib.nullcontext()):
            samples, _ = sampler.sample(
                num_steps, n, (4, h, w), cond, x_T=x_T, verbose=False, eta=0.0,
                unconditional_guidance_scale=guidance_scale, unconditional_conditioning=uncond,
            )
        return samples.float()

    def layouts(name, module, grid):
        if not name.endswith("attn2"):
            return None
        nq = grid[0] * grid[1]
        return "clip-token", TokenLayout("cross", "clip", nq, 1, Tokens.block(grid), Tokens.block((1, 1)))

    return TryOnSystem(
        name=f"dci_{attention}_{call_style}",
        target=model,
        denoiser=unet,
        denoiser_call=call_style,
        run=run,
        latent_grid=tuple(latent_grid),
        num_steps=len(timesteps),
        timesteps=timesteps,
        schedule="ldm DDIMSampler: np.flip(ddim_timesteps); the UNet gets torch.full((batch,), t) (long)",
        n_images=n,
        cfg="doubled",
        halves="context only: learnable vector (uncond) vs projected CLIP token (cond); x (9 channels) identical",
        layers=_ldm_layers(unet, latent_grid, layouts),
        sampler=sampler,
    )



BUILDERS = {
    "stableviton": stableviton_like,
    "stableviton_softmax_positional": lambda: stableviton_like(attention="softmax", call_style="ldm_positional"),
    "stableviton_plms": lambda: stableviton_like(sampler="plms"),
    "dci": dci_like,
    "dci_xformers_positional": lambda: dci_like(attention="xformers", call_style="ldm_positional"),
    "idm_block": idm_like,
    "idm_processor": lambda: idm_like(appending="processor"),
    "catvton_height": catvton_like,
    "catvton_width": lambda: catvton_like(stacking="width"),
    "catvton_height_own_processor": lambda: catvton_like(self_attention_processor="own"),
}


def build(name: str) -> TryOnSystem:
    return BUILDERS[name]()


if __name__ == "__main__":  # smoke run: python tests/tryon_systems.py
    import time

    for key in BUILDERS:
        t0 = time.perf_counter()
        system = build(key)
        t1 = time.perf_counter()
        out = system.run(seed=0)
        t2 = time.perf_counter()
        again = system.run(seed=0)
        print(
            f"{key:32s} build {t1 - t0:5.2f}s run {t2 - t1:5.2f}s out {tuple(out.shape)} "
            f"finite {bool(torch.isfinite(out).all())} deterministic {torch.equal(out, again)} "
            f"steps {system.timesteps} layers {len(system.layers)}"
        )
