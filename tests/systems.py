"""Tiny random-weight image-conditioned diffusion systems for the ``i2am_fast.trace`` tests.

Everything is built from configs with seeded random weights; nothing is downloaded. Each
system is small enough that a whole denoising run takes a fraction of a second on CPU.

Every builder returns a ``System``: what to pass to ``i2am_fast.trace`` (``target``), the
module whose forward receives ``(sample, timestep, ...)`` (``denoiser``), how to run it
(``run(seed)`` returns the final image or latents as a float32 tensor) and what a test needs
to know to compute the expected maps independently of the tracer: the latent grid, the
number of denoising steps, how classifier-free guidance is batched, each cross-attention
layer's generated grid and reference-grid layout.

The systems (docs/design.md, "Supported systems"):

1. ``paint_by_example()``: diffusers ``PaintByExamplePipeline`` (one reference token, 1x1).
2. ``custom_model()``: the paper's custom model: an SD-1.5-style UNet with 12 input channels
   (noisy + masked-person + pose latents) whose cross-attention reads all tokens of a tiny
   transformers CLIP vision tower (CLS + 4x4 patches), in a hand-written DDIM loop with
   guidance as one doubled batch, or (``separate=True``) as two UNet calls per step.
3. ``stableviton_like()``: a bare ``nn.Module`` with diffusers ``Attention`` blocks at three
   resolutions whose keys are a reference feature map at the block's own resolution
   (``Nk == Nq``), on an odd latent (13x10) so that ceil-halving matters; run with
   ``trace(module, num_steps=...)``.
4. ``ip_adapter()``: a text-conditioned UNet whose cross-attention processors are diffusers'
   ``IPAdapterAttnProcessor2_0`` (4 image tokens, a 2x2 grid), image embeds passed through
   ``encoder_hid_proj`` as diffusers' IP-Adapter loader sets it up.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import diffusers
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection, Timesteps

# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with torch's global CPU generator seeded, leaving the caller's state intact."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def halve(grid: tuple[int, int], times: int) -> tuple[int, int]:
    """The latent grid after ``times`` stride-2 downsamplings: ``ceil(h/2)`` each time."""
    h, w = grid
    for _ in range(times):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def cross_attention_modules(module: nn.Module) -> dict[str, Attention]:
    """Name (relative to ``module``) -> diffusers ``Attention`` module, cross-attention only."""
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, Attention) and getattr(m, "is_cross_attention", False)
    }


def attention_processors(module: nn.Module) -> dict[str, Any]:
    """Name -> processor object of every diffusers ``Attention`` module in ``module``."""
    return {name: m.processor for name, m in module.named_modules() if isinstance(m, Attention)}


def ddim_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_unet(in_channels: int, cross_attention_dim: int, heads: int = 2) -> UNet2DConditionModel:
    """An SD-1.5-shaped UNet, tiny: cross-attention at the latent grid, the grid halved once,
    and (mid block) halved twice; 7 cross-attention layers, ``heads`` heads each."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,  # diffusers' legacy name: the number of heads
        norm_num_groups=8,
    ).eval()


def unet_layer_halvings(name: str) -> int:
    """How many times the latent grid is halved at a cross-attention layer of ``tiny_unet``."""
    if name.startswith("mid_block."):
        return 2
    block = int(name.split(".")[1])
    if name.startswith("down_blocks."):
        return block  # down_blocks.0: latent grid, down_blocks.1: halved once
    return 2 - block  # up_blocks.1: halved once, up_blocks.2: latent grid


# ----------------------------------------------------------------------------------------------
# The system description the tests use
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class System:
    name: str
    target: Any  # what to pass to i2am_fast.trace
    denoiser: nn.Module  # the module called once per (step[, CFG half]) with (sample, timestep, ...)
    run: Callable[..., torch.Tensor]  # run(seed=0) -> final image/latents (float32)
    latent_grid: tuple[int, int]
    num_steps: int
    n_images: int  # images per run (per CFG half)
    cfg_layout: str  # "doubled" | "separate" | "none": how the run batches guidance
    layer_grid: Callable[[str], tuple[int, int]]  # layer name -> generated grid (h_l, w_l)
    # layer name, num_keys, generated grid -> (reference grid, offset of its first token)
    reference_layout: Callable[[str, int, tuple[int, int]], tuple[tuple[int, int], int]]
    scheduler: Optional[DDIMScheduler] = None  # None: a bare module (trace needs num_steps)
    image_scale: int = 8  # an image-sized inpaint mask is latent_grid * image_scale
    trace_kwargs: dict = dataclasses.field(default_factory=dict)  # always passed to trace()
    ip_adapter: bool = False  # the cross-attention maps come from the IP-Adapter image branch
    heads: int = 2

    def cross_attention_layers(self) -> dict[str, Attention]:
        return cross_attention_modules(self.denoiser)

    def processors(self) -> dict[str, Any]:
        return attention_processors(self.denoiser)

    def image_grid(self) -> tuple[int, int]:
        return (self.latent_grid[0] * self.image_scale, self.latent_grid[1] * self.image_scale)


def _unet_layer_grid(latent_grid):
    return lambda name: halve(latent_grid, unet_layer_halvings(name))


# ----------------------------------------------------------------------------------------------
# 1. Paint-by-Example
# ----------------------------------------------------------------------------------------------


def paint_by_example(
    image_size: tuple[int, int] = (80, 48), num_steps: int = 5, num_images: int = 1, seed: int = 0
) -> System:
    """A tiny ``PaintByExamplePipeline``: 80x48 pixels -> 10x6 latents (5x3, 3x2 deeper),
    one reference token (the CLS embedding through the mapper) per cross-attention."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder

    proj = 32
    with seeded(seed):
        unet = tiny_unet(in_channels=9, cross_attention_dim=proj)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=64,
        ).eval()
        encoder_config = CLIPVisionConfig(
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=4,  # the mapper gets (4 + 1) // 5 = 1 block
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=proj,
        )
        image_encoder = PaintByExampleImageEncoder(encoder_config, proj_size=proj).eval()
    feature_extractor = CLIPImageProcessor(crop_size=32, size=32)
    pipe = diffusers.PaintByExamplePipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=ddim_scheduler(),
        safety_checker=None,
        feature_extractor=feature_extractor,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8

    H, W = image_size

    def run(seed: int = 0, guidance_scale: float = 5.0, output_type: str = "pt") -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        image = torch.rand(1, 3, H, W, generator=g) * 2 - 1
        mask = torch.zeros(1, 1, H, W)
        mask[:, :, H // 4 : 3 * H // 4, W // 4 : 3 * W // 4] = 1.0
        example = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1  # a tensor skips the feature extractor
        out = pipe(
            example_image=example,
            image=image,
            mask_image=mask,
            num_inference_steps=num_steps,
            guidance_scale=guidance_scale,
            num_images_per_prompt=num_images,
            generator=g,
            output_type=output_type,
        )
        return out.images

    latent = (H // 8, W // 8)
    return System(
        name="paint_by_example",
        target=pipe,
        denoiser=unet,
        run=run,
        latent_grid=latent,
        num_steps=num_steps,
        n_images=num_images,
        cfg_layout="doubled",
        layer_grid=_unet_layer_grid(latent),
        reference_layout=lambda name, nk, grid: ((1, 1), 0),
        scheduler=pipe.scheduler,
        image_scale=pipe.vae_scale_factor,
    )


# ----------------------------------------------------------------------------------------------
# 2. The paper's custom model
# ----------------------------------------------------------------------------------------------


class CustomTryOn:
    """The paper's custom model: a 12-channel SD-1.5-style UNet conditioned on every output
    token of a CLIP vision tower (1 CLS + 4x4 patch tokens), sampled with DDIM and guidance
    (unconditional embeddings: zeros). ``trace(self)`` finds ``.unet`` and ``.scheduler``."""

    def __init__(self, latent_grid=(12, 10), num_steps=6, num_images=2, separate=False, seed=0):
        from transformers import CLIPVisionConfig, CLIPVisionModel

        hidden = 24
        with seeded(seed):
            self.image_encoder = CLIPVisionModel(
                CLIPVisionConfig(
                    hidden_size=hidden,
                    intermediate_size=48,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    image_size=32,
                    patch_size=8,
                )
            ).eval()
            self.unet = tiny_unet(in_channels=12, cross_attention_dim=hidden)
        self.scheduler = ddim_scheduler()
        self.latent_grid = latent_grid
        self.num_steps = num_steps
        self.num_images = num_images
        self.separate = separate

    @torch.no_grad()
    def __call__(self, seed: int = 0, guidance_scale: float = 4.0) -> torch.Tensor:
        n, (h, w) = self.num_images, self.latent_grid
        g = torch.Generator().manual_seed(seed)
        cloth = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
        agnostic = torch.randn(n, 4, h, w, generator=g)
        pose = torch.randn(n, 4, h, w, generator=g)
        latents = torch.randn(n, 4, h, w, generator=g)
        cond = self.image_encoder(pixel_values=cloth).last_hidden_state  # [n, 1 + 16, hidden]
        uncond = torch.zeros_like(cond)
        self.scheduler.set_timesteps(self.num_steps)
        latents = latents * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            if self.separate:
                x = torch.cat([self.scheduler.scale_model_input(latents, t), agnostic, pose], dim=1)
                eps_uncond = self.unet(x, t, encoder_hidden_states=uncond).sample
                eps_cond = self.unet(x, t, encoder_hidden_states=cond).sample
            else:
                x = self.scheduler.scale_model_input(torch.cat([latents] * 2), t)
                x = torch.cat([x, torch.cat([agnostic] * 2), torch.cat([pose] * 2)], dim=1)
                eps = self.unet(x, t, encoder_hidden_states=torch.cat([uncond, cond])).sample
                eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            latents = self.scheduler.step(eps, t, latents).prev_sample
        return latents


def custom_model(
    latent_grid=(12, 10), num_steps: int = 6, num_images: int = 2, separate: bool = False, seed: int = 0
) -> System:
    model = CustomTryOn(latent_grid, num_steps, num_images, separate, seed)
    return System(
        name="custom_separate" if separate else "custom",
        target=model,
        denoiser=model.unet,
        run=model,
        latent_grid=latent_grid,
        num_steps=num_steps,
        n_images=num_images,
        cfg_layout="separate" if separate else "doubled",
        layer_grid=_unet_layer_grid(latent_grid),
        reference_layout=lambda name, nk, grid: ((4, 4), 1),  # CLS + 4x4 patches
        scheduler=model.scheduler,
        image_scale=8,  # not a diffusers pipeline: no vae_scale_factor, trace assumes 8
        trace_kwargs={"cfg_layout": "separate"} if separate else {},
    )


# ----------------------------------------------------------------------------------------------
# 3. StableVITON-like: spatial keys at each block's own resolution
# ----------------------------------------------------------------------------------------------


class TinySpatialCrossAttentionNet(nn.Module):
    """A small U-shaped denoiser whose cross-attention reads a reference (clothing) feature map
    at each level's own resolution, like StableVITON's zero cross-attention: ``Nk == Nq``.

    ``forward(sample, timestep, reference_features)``. Three levels (grid, ceil-halved once,
    twice); level 0 passes 4-D hidden states to its ``Attention`` (group norm, residual inside),
    levels 1 and 2 pass token sequences; level 1 layer-norms the reference tokens
    (``norm_cross``)."""

    def __init__(self, in_channels=4, ref_channels=6, channels=(8, 16, 16), ref_width=12, heads=2):
        super().__init__()
        c0, c1, c2 = channels
        self.time_proj = Timesteps(c0, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_mlp = nn.Sequential(nn.Linear(c0, 32), nn.SiLU(), nn.Linear(32, c0 + c1 + c2))
        self.channels = channels
        self.conv_in = nn.Conv2d(in_channels, c0, 3, padding=1)
        self.down1 = nn.Conv2d(c0, c1, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.ref_in = nn.Conv2d(ref_channels, ref_width, 3, padding=1)
        self.ref_down1 = nn.Conv2d(ref_width, ref_width, 3, stride=2, padding=1)
        self.ref_down2 = nn.Conv2d(ref_width, ref_width, 3, stride=2, padding=1)
        self.attn0 = Attention(
            query_dim=c0, cross_attention_dim=ref_width, heads=heads, dim_head=c0 // heads,
            norm_num_groups=4, residual_connection=True,
        )
        self.attn1 = Attention(
            query_dim=c1, cross_attention_dim=ref_width, heads=heads, dim_head=c1 // heads,
            cross_attention_norm="layer_norm",
        )
        self.attn2 = Attention(query_dim=c2, cross_attention_dim=ref_width, heads=heads, dim_head=c2 // heads)
        self.up1 = nn.Conv2d(c2 + c1, c1, 3, padding=1)
        self.up0 = nn.Conv2d(c1 + c0, c0, 3, padding=1)
        self.conv_out = nn.Conv2d(c0, in_channels, 3, padding=1)

    @staticmethod
    def _tokens(x):
        return x.flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h*w, C]

    @staticmethod
    def _attend(attn, h, ref):
        b, c, hh, ww = h.shape
        out = attn(TinySpatialCrossAttentionNet._tokens(h), encoder_hidden_states=TinySpatialCrossAttentionNet._tokens(ref))
        return h + out.transpose(1, 2).reshape(b, c, hh, ww)

    def forward(self, sample, timestep, reference_features):
        b = sample.shape[0]
        t = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1).expand(b)
        temb = self.time_mlp(self.time_proj(t).to(sample.dtype))
        t0, t1, t2 = temb.split(list(self.channels), dim=1)
        r0 = self.ref_in(reference_features)
        r1 = self.ref_down1(F.silu(r0))
        r2 = self.ref_down2(F.silu(r1))
        h0 = self.conv_in(sample) + t0[:, :, None, None]
        h0 = self.attn0(h0, encoder_hidden_states=self._tokens(r0))  # 4-D in, residual inside
        h1 = self.down1(F.silu(h0)) + t1[:, :, None, None]
        h1 = self._attend(self.attn1, h1, r1)
        h2 = self.down2(F.silu(h1)) + t2[:, :, None, None]
        h2 = self._attend(self.attn2, h2, r2)
        u1 = F.interpolate(h2, size=h1.shape[-2:], mode="nearest")
        u1 = self.up1(F.silu(torch.cat([u1, h1], dim=1)))
        u0 = F.interpolate(u1, size=h0.shape[-2:], mode="nearest")
        u0 = self.up0(F.silu(torch.cat([u0, h0], dim=1)))
        return self.conv_out(F.silu(u0))


def stableviton_like(
    latent_grid=(13, 10), num_steps: int = 4, num_images: int = 2, guidance: bool = False,
    timestep_as_kwarg: bool = False, sharpness: float = 1.0, seed: int = 0,
) -> System:
    """The spatial-key module in a manual DDIM loop. ``guidance=False``: a plain batch of
    ``num_images`` different latents (no CFG halves); ``guidance=True``: the doubled batch
    ``[uncond (zero reference features), cond]``. ``timestep_as_kwarg``: call
    ``module(sample, timestep=t, reference_features=...)`` instead of positionally.
    ``sharpness`` scales every ``to_q`` weight: peaky attention, so that maps have sharp
    edges and the bicubic resize undershoots 0 (the clamp matters)."""
    with seeded(seed):
        module = TinySpatialCrossAttentionNet().eval()
        with torch.no_grad():
            for attn in (module.attn0, module.attn1, module.attn2):
                attn.to_q.weight.mul_(sharpness)
    scheduler = ddim_scheduler()
    h, w = latent_grid
    n = num_images

    @torch.no_grad()
    def run(seed: int = 0, guidance_scale: float = 3.0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        cloth = torch.randn(n, 6, h, w, generator=g)
        latents = torch.randn(n, 4, h, w, generator=g)
        scheduler.set_timesteps(num_steps)
        for t in scheduler.timesteps:
            if guidance:
                x, ref = torch.cat([latents] * 2), torch.cat([torch.zeros_like(cloth), cloth])
            else:
                x, ref = latents, cloth
            if timestep_as_kwarg:
                eps = module(x, timestep=t, reference_features=ref)
            else:
                eps = module(x, t, ref)
            if guidance:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            latents = scheduler.step(eps, t, latents).prev_sample
        return latents

    names = {"attn0": 0, "attn1": 1, "attn2": 2}
    return System(
        name="stableviton_cfg" if guidance else "stableviton",
        target=module,
        denoiser=module,
        run=run,
        latent_grid=latent_grid,
        num_steps=num_steps,
        n_images=n,
        cfg_layout="doubled" if guidance else "none",
        layer_grid=lambda name: halve(latent_grid, names[name]),
        reference_layout=lambda name, nk, grid: (grid, 0),  # Nk == Nq: the layer's own grid
        scheduler=None,
        trace_kwargs={"num_steps": num_steps},
    )


# ----------------------------------------------------------------------------------------------
# 4. IP-Adapter
# ----------------------------------------------------------------------------------------------


def ip_adapter(
    latent_grid=(6, 10), num_steps: int = 4, num_images: int = 1, num_tokens: int = 4, seed: int = 0
) -> System:
    """A text-conditioned tiny UNet with diffusers' IP-Adapter attention processors on every
    cross-attention (random ``to_k_ip``/``to_v_ip``), ``encoder_hid_proj`` =
    ``MultiIPAdapterImageProjection([ImageProjection(...)])`` and ``encoder_hid_dim_type =
    "ip_image_proj"`` as diffusers' ``_load_ip_adapter_weights`` sets them. Text: 7 random
    tokens; image: ``num_tokens`` tokens from one global embedding, a token list (read as a
    ``1 x num_tokens`` strip, not a grid). CFG as one doubled batch
    with zero negative image embeds (as diffusers does)."""
    text_dim, image_embed_dim = 32, 16
    with seeded(seed):
        unet = tiny_unet(in_channels=4, cross_attention_dim=text_dim)
        unet.encoder_hid_proj = MultiIPAdapterImageProjection(
            [ImageProjection(image_embed_dim=image_embed_dim, cross_attention_dim=text_dim, num_image_text_embeds=num_tokens)]
        ).eval()
        unet.config.encoder_hid_dim_type = "ip_image_proj"
        processors = {}
        for name, proc in unet.attn_processors.items():
            if name.endswith("attn2.processor"):
                attn = unet.get_submodule(name[: -len(".processor")])
                processors[name] = IPAdapterAttnProcessor2_0(
                    hidden_size=attn.to_q.out_features, cross_attention_dim=text_dim, num_tokens=(num_tokens,), scale=1.0
                ).eval()
            else:
                processors[name] = proc
        unet.set_attn_processor(processors)
    scheduler = ddim_scheduler()
    h, w = latent_grid
    n = num_images

    class IPAdapterLoop:
        def __init__(self):
            self.unet = unet
            self.scheduler = scheduler

        @torch.no_grad()
        def __call__(self, seed: int = 0, guidance_scale: float = 4.0) -> torch.Tensor:
            g = torch.Generator().manual_seed(seed)
            text = torch.randn(n, 7, text_dim, generator=g)
            negative_text = torch.randn(n, 7, text_dim, generator=g)
            image_embeds = torch.randn(n, 1, image_embed_dim, generator=g)  # [batch, num_images, dim]
            latents = torch.randn(n, 4, h, w, generator=g)
            prompt = torch.cat([negative_text, text])
            ip = [torch.cat([torch.zeros_like(image_embeds), image_embeds])]
            self.scheduler.set_timesteps(num_steps)
            for t in self.scheduler.timesteps:
                x = self.scheduler.scale_model_input(torch.cat([latents] * 2), t)
                eps = self.unet(x, t, encoder_hidden_states=prompt, added_cond_kwargs={"image_embeds": ip}).sample
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
                latents = self.scheduler.step(eps, t, latents).prev_sample
            return latents

    loop = IPAdapterLoop()
    return System(
        name="ip_adapter",
        target=loop,
        denoiser=unet,
        run=loop,
        latent_grid=latent_grid,
        num_steps=num_steps,
        n_images=n,
        cfg_layout="doubled",
        layer_grid=_unet_layer_grid(latent_grid),
        reference_layout=lambda name, nk, grid: ((1, nk), 0),  # a token list: a strip
        scheduler=scheduler,
        ip_adapter=True,
    )


# ----------------------------------------------------------------------------------------------
# 5. A grid the tracer cannot infer: 7 context tokens (not n², not 1 + n², not Nq)
# ----------------------------------------------------------------------------------------------


def ambiguous_tokens(latent_grid=(8, 6), num_tokens: int = 7, num_steps: int = 2, seed: int = 0) -> System:
    """A bare tiny UNet called directly, one image, no guidance, with ``num_tokens`` context
    tokens per cross-attention: 7 tokens match none of the inference rules, so ``trace`` needs
    ``reference_grid`` (e.g. ``(2, 3)``: the last 6 tokens, one leading token off the grid)."""
    with seeded(seed):
        unet = tiny_unet(in_channels=4, cross_attention_dim=24)
    h, w = latent_grid
    timesteps = [900 - 400 * i for i in range(num_steps)]

    @torch.no_grad()
    def run(seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 4, h, w, generator=g)
        context = torch.randn(1, num_tokens, 24, generator=g)
        for t in timesteps:
            x = x - 0.1 * unet(x, torch.tensor(t), encoder_hidden_states=context).sample
        return x

    return System(
        name="ambiguous",
        target=unet,
        denoiser=unet,
        run=run,
        latent_grid=latent_grid,
        num_steps=num_steps,
        n_images=1,
        cfg_layout="none",
        layer_grid=_unet_layer_grid(latent_grid),
        reference_layout=lambda name, nk, grid: ((2, 3), nk - 6),
        scheduler=None,
        trace_kwargs={"num_steps": num_steps},
    )


BUILDERS = {
    "paint_by_example": paint_by_example,
    "custom": custom_model,
    "custom_separate": lambda: custom_model(num_images=1, separate=True),
    "stableviton": lambda: stableviton_like(sharpness=8.0),
    "stableviton_cfg": lambda: stableviton_like(num_images=1, guidance=True, timestep_as_kwarg=True),
    "ip_adapter": ip_adapter,
    "ambiguous": ambiguous_tokens,
}


def build(name: str) -> System:
    return BUILDERS[name]()


if __name__ == "__main__":  # smoke run: python tests/systems.py
    import time

    for key in BUILDERS:
        t0 = time.perf_counter()
        system = build(key)
        t1 = time.perf_counter()
        out = system.run(seed=0)
        t2 = time.perf_counter()
        again = system.run(seed=0)
        layers = system.cross_attention_layers()
        print(
            f"{key:18s} build {t1 - t0:5.2f}s run {t2 - t1:5.2f}s out {tuple(out.shape)} "
            f"finite {bool(torch.isfinite(out).all())} deterministic {torch.equal(out, again)} "
            f"cross-attention layers {len(layers)}"
        )
