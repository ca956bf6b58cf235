"""Tiny random-weight MMDiT pipelines (diffusers 0.42) for tests of tracing joint attention.

Every builder returns an ``MMDiTSystem``: the diffusers pipeline (what a user hands to
``i2am_fast.trace``), its transformer, ``run(seed)`` and the facts a test needs to compute
expected maps WITHOUT the tracer: how the transformer is called, where the target and
reference tokens sit in each attention call, the grids, masks and the guidance call order.
Nothing is downloaded: the pipelines are assembled from configs with seeded random weights,
prompts are passed as ready embeddings (no tokenizer or text encoder), and image encoders
(CLIP / SigLIP) are tiny ``transformers`` models built from configs.

The systems (see ``docs/design.md``, reference tokens inside one softmax):

1. ``flux_kontext()``: ``FluxKontextPipeline``; joint attention over
   ``[text | target | reference]``; the reference image is resized to a preferred Kontext
   resolution (about one megapixel) whatever the target size, so its grid differs from the
   target's. ``true_cfg=True`` adds a negative prompt and ``true_cfg_scale > 1``: two
   transformer calls per step, the conditional one FIRST.
2. ``flux_redux()``: ``FluxPipeline`` whose ``prompt_embeds`` are ``[T5 tokens | Redux image
   tokens]`` as ``FluxPriorReduxPipeline`` builds them (SigLIP patch tokens through
   ``ReduxImageEncoder``, appended after the T5 tokens).
3. ``flux_ip_adapter()``: ``FluxPipeline`` with an IP-Adapter loaded through
   ``pipe.load_ip_adapter`` from a random state dict (the loader's own code path): the
   double-stream blocks run a second attention of the pre-RoPE image queries over 4 IP tokens.
4. ``sd3_ip_adapter()``: ``StableDiffusion3Pipeline`` with an SD3.5-style IP-Adapter
   (``SD3IPAdapterJointAttnProcessor2_0`` on every block, ``IPAdapterTimeImageProjection``
   resampler with 16 learned queries) loaded through ``pipe.load_ip_adapter``; guidance as one
   doubled batch ``[uncond, cond]``.
5. ``qwen_image_edit()``: ``QwenImageEditPipeline``; ``[text | target ; reference]``, two
   prompts of different lengths (so the text padding mask reaches attention), true CFG as
   two calls per step (conditional first); ``zero_cond_t=True`` builds the transformer whose
   reference tokens are modulated with timestep 0.

Two pipelines resize their reference image to about one megapixel (Kontext's preferred
resolutions; Qwen's ``calculate_dimensions(1024 * 1024, ...)``). A real VAE at that size
costs seconds on a CPU, so those two use ``PatchAutoencoder``: a stand-in with the VAE
interface the pipelines use (pixel unshuffle by the scale factor and a random 1x1
convolution; the inverse to decode). Its scale factor is chosen so that the reference stays a
few hundred (Kontext) or about a thousand (Qwen) tokens; the other systems use diffusers'
``AutoencoderKL`` (scale factor 8) at 64x48 pixels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImageEditPipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin

# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with torch's global CPU generator seeded, leaving the caller's state intact."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def random_image(width: int, height: int, seed: int) -> Image.Image:
    """A seeded RGB noise picture with a smooth gradient, ``width`` x ``height`` pixels."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=(height, width, 3))
    ramp = np.linspace(0, 255, width)[None, :, None]
    return Image.fromarray(((noise + ramp) / 2).astype(np.uint8), mode="RGB")


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1's scheduler config (dynamic shifting from the image sequence length)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )


def qwen_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Qwen-Image's scheduler config (exponential time shift, terminal shift 0.02)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )


def sd3_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """SD3's scheduler config (static shift 3)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


class PatchAutoencoder(ModelMixin, ConfigMixin):
    """A cheap stand-in for a VAE: ``factor x factor`` pixel patches to ``latent_channels``
    by a random 1x1 convolution (and back). It carries the config fields the Flux pipelines
    (``block_out_channels``, ``latent_channels``, ``scaling_factor``, ``shift_factor``) and the
    Qwen pipelines (``z_dim``, ``latents_mean``, ``latents_std``, ``temperal_downsample``) read;
    ``frames=True`` takes and returns Qwen's 5-D ``[B, C, 1, H, W]`` tensors."""

    @register_to_config
    def __init__(self, factor: int = 16, latent_channels: int = 4, frames: bool = False,
                 scaling_factor: float = 0.3611, shift_factor: float = 0.1159):
        super().__init__()
        levels = int(math.log2(factor))
        if 2**levels != factor:
            raise ValueError(f"factor must be a power of 2, got {factor}")
        self.register_to_config(
            block_out_channels=[4] * (levels + 1), z_dim=latent_channels,
            latents_mean=[0.0] * latent_channels, latents_std=[1.0] * latent_channels,
        )
        self.temperal_downsample = [False] + [True] * (levels - 1)  # only its length is read
        self.encoder = nn.Conv2d(3 * factor * factor, 2 * latent_channels, 1)
        self.decoder = nn.Conv2d(latent_channels, 3 * factor * factor, 1)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        frames = x.dim() == 5
        if frames:
            x = x[:, :, 0]
        moments = self.encoder(F.pixel_unshuffle(x, self.config.factor))
        if frames:
            moments = moments[:, :, None]
        dist = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        frames = z.dim() == 5
        if frames:
            z = z[:, :, 0]
        x = F.pixel_shuffle(self.decoder(z), self.config.factor)
        if frames:
            x = x[:, :, None]
        return DecoderOutput(sample=x) if return_dict else (x,)


def tiny_kl_vae(latent_channels: int = 4, shift_factor: Optional[float] = 0.1159) -> AutoencoderKL:
    """diffusers' ``AutoencoderKL`` with 4 levels (scale factor 8), 4 channels each."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=2, sample_size=32, scaling_factor=0.3611,
        shift_factor=shift_factor, use_quant_conv=shift_factor is None, use_post_quant_conv=shift_factor is None,
    ).eval()


FLUX_HEADS, FLUX_HEAD_DIM, FLUX_TEXT_DIM, FLUX_POOLED_DIM = 2, 16, 32, 16


def tiny_flux_transformer(latent_channels: int = 4) -> FluxTransformer2DModel:
    """FLUX.1-dev-shaped (guidance embedding on): 2 double-stream and 2 single-stream blocks,
    2 heads of 16 (RoPE axes 4 + 6 + 6)."""
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=2, num_single_layers=2,
        attention_head_dim=FLUX_HEAD_DIM, num_attention_heads=FLUX_HEADS, joint_attention_dim=FLUX_TEXT_DIM,
        pooled_projection_dim=FLUX_POOLED_DIM, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    ).eval()


def tiny_clip_vision(projection_dim: int = 24):
    """A CLIP vision tower with projection (``image_embeds``), 32x32 input, and its PIL processor."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=projection_dim)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPVisionModelWithProjection(config).eval(), processor


def tiny_siglip_vision(hidden: int = 32, image_size: int = 32, patch_size: int = 8):
    """A SigLIP vision tower (``(image_size / patch_size)^2`` patch tokens, no CLS) and its PIL processor."""
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    config = SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                num_attention_heads=2, image_size=image_size, patch_size=patch_size)
    processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    return SiglipVisionModel(config).eval(), processor


# ----------------------------------------------------------------------------------------------
# What a test needs to know
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CallFacts:
    """One transformer call, decoded from its keyword arguments by the system (never by i2am_fast)."""

    batch: int
    timestep: float  # first entry, exactly as the transformer received it
    text_len: int  # tokens of the text stream (T5 tokens, plus Redux tokens for Flux Redux)
    image_len: int  # tokens of the image stream (target, plus reference for Kontext / Qwen)
    target_grid: tuple[int, int]  # (h, w) of the generated tokens
    reference_grid: Optional[tuple[int, int]]  # (h, w) of reference image tokens in the joint attention
    text_mask: Optional[torch.Tensor]  # bool [B, text_len], True = the text token takes part (Qwen)


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of one attention kernel call sit along the sequence axis of its q / k.

    ``generated`` are the query positions of the generated (target) tokens, row-major over
    ``generated_grid``: the map's ``Qg``. ``reference`` are the key positions of the reference
    tokens (``Kr``), row-major over ``reference_grid``, or a plain token list when
    ``reference_grid`` is None. ``reference`` is None where the call has no reference tokens
    (text-only joint attention). ``key_padding_mask`` is ``[B, num_keys]`` bool (True = the
    key takes part) or None. ``shared_softmax``: the reference keys share the softmax with
    other keys (text, image), so the share map exists."""

    num_queries: int
    num_keys: int
    generated: range
    generated_grid: tuple[int, int]
    reference: Optional[range]
    reference_grid: Optional[tuple[int, int]]
    source: Optional[str]  # name of the reference source ("kontext", "redux", "ip0", "edit image")
    key_padding_mask: Optional[torch.Tensor]
    shared_softmax: bool


@dataclasses.dataclass
class MMDiTSystem:
    name: str
    pipe: Any  # the diffusers pipeline: what to pass to i2am_fast.trace
    transformer: nn.Module  # the denoiser, called once per (step, guidance call)
    run: Callable[..., torch.Tensor]  # run(seed=0, output_type="latent") -> float32 tensor
    family: str  # "flux" | "sd3" | "qwen"
    num_steps: int
    # keyword names of the transformer call (every pipeline here calls it with keywords only)
    call_keywords: dict[str, str]
    # the transformer's timestep = scheduler timestep * timestep_scale (1/1000 for Flux and Qwen)
    timestep_scale: float
    guidance: str  # "none" | "doubled" ([uncond, cond] in one call) | "separate" (calls per step)
    call_order: tuple[str, ...]  # per step: ("cond",), ("cond", "uncond") or ("uncond|cond",)
    batch: int  # images per transformer call (per guidance half for "doubled")
    target_grid: tuple[int, int]  # generated token grid (packed latent grid for Flux / Qwen)
    reference_grid: Optional[tuple[int, int]]  # None: no reference grid (token list or none)
    pixels_per_token: int  # image pixels per generated token side (2 * vae_scale_factor for Flux / Qwen)
    attention_modules: dict[str, nn.Module]  # name -> every attention module of the transformer
    excluded_modules: dict[str, nn.Module]  # attention modules elsewhere that must never be traced
    decode_call: Callable[[dict], CallFacts]  # transformer call kwargs -> facts
    # (module name, kernel call index within that module's forward, facts) -> layout
    layout: Callable[[str, int, CallFacts], TokenLayout]
    kernel_calls: Callable[[str], int]  # module name -> attention kernel calls per forward
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def scheduler(self):
        return self.pipe.scheduler

    def step_of(self, timestep: float) -> int:
        """Index of the scheduler timestep nearest to ``timestep / timestep_scale``."""
        ts = self.pipe.scheduler.timesteps.double() * self.timestep_scale
        return int((ts - float(timestep)).abs().argmin())

    def calls_per_step(self) -> int:
        return len(self.call_order)


def _flux_attention_modules(transformer) -> dict[str, nn.Module]:
    from diffusers.models.transformers.transformer_flux import FluxAttention

    return {n: m for n, m in transformer.named_modules() if isinstance(m, FluxAttention)}


def _grid_from_ids(ids: torch.Tensor) -> tuple[int, int]:
    return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1


def _flux_facts(kwargs: dict) -> CallFacts:
    """Flux / Kontext: the image stream holds target tokens (``img_ids[:, 0] == 0``) followed by
    Kontext reference tokens (``img_ids[:, 0] == 1``, rows and columns from 0 again)."""
    hidden, text, ids = kwargs["hidden_states"], kwargs["encoder_hidden_states"], kwargs["img_ids"]
    if ids.dim() == 3:  # deprecated batched form
        ids = ids[0]
    target, reference = ids[ids[:, 0] == 0], ids[ids[:, 0] == 1]
    return CallFacts(
        batch=hidden.shape[0], timestep=float(kwargs["timestep"].flatten()[0]), text_len=text.shape[1],
        image_len=hidden.shape[1], target_grid=_grid_from_ids(target),
        reference_grid=_grid_from_ids(reference) if len(reference) else None, text_mask=None,
    )


FLUX_KEYWORDS = {
    "latents": "hidden_states", "timestep": "timestep", "text": "encoder_hidden_states",
    "pooled": "pooled_projections", "image_ids": "img_ids", "text_ids": "txt_ids", "guidance": "guidance",
    "attention_kwargs": "joint_attention_kwargs",
}


def _flux_system_common(pipe, name, num_steps, true_cfg, batch, target_grid, reference_grid, run, layout,
                        kernel_calls, extra):
    return MMDiTSystem(
        name=name, pipe=pipe, transformer=pipe.transformer, run=run, family="flux", num_steps=num_steps,
        call_keywords=dict(FLUX_KEYWORDS), timestep_scale=1e-3,
        guidance="separate" if true_cfg else "none", call_order=("cond", "uncond") if true_cfg else ("cond",),
        batch=batch, target_grid=target_grid, reference_grid=reference_grid,
        pixels_per_token=2 * pipe.vae_scale_factor, attention_modules=_flux_attention_modules(pipe.transformer),
        excluded_modules={}, decode_call=_flux_facts, layout=layout, kernel_calls=kernel_calls, extra=extra,
    )


# ----------------------------------------------------------------------------------------------
# 1. FLUX.1 Kontext
# ----------------------------------------------------------------------------------------------


def flux_kontext(size=(192, 256), image_size=(192, 256), num_steps: int = 2, true_cfg: bool = False,
                 vae_factor: int = 32, text_len: int = 8, seed: int = 0) -> MMDiTSystem:
    """``FluxKontextPipeline``, target ``size = (height, width)`` pixels (``max_area`` = its area,
    so the target keeps that size), a ``image_size = (width, height)`` reference picture that
    the pipeline resizes to the preferred Kontext resolution of its aspect ratio (0.75 ->
    880x1184, cut to multiples of ``2 * vae_factor`` = 832x1152). Default: target grid 3x4,
    reference grid 18x13 (234 tokens). ``true_cfg``: negative prompt embeddings and ``true_cfg_scale=4``."""
    with seeded(seed):
        transformer = tiny_flux_transformer()
        vae = PatchAutoencoder(factor=vae_factor, latent_channels=4).eval()
    pipe = FluxKontextPipeline(scheduler=flux_scheduler(), vae=vae, text_encoder=None, tokenizer=None,
                               text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    height, width = size
    multiple = 2 * pipe.vae_scale_factor
    assert height % multiple == 0 and width % multiple == 0, "pick a size the pipeline keeps"
    target_grid = (height // multiple, width // multiple)
    # the pipeline's own choice of reference size: the picture's size cut to multiples of
    # 2 * vae_scale_factor (a side below that becomes 0!), then the preferred resolution of
    # the nearest aspect ratio, cut to multiples again
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    cut_h, cut_w = pipe.image_processor.get_default_height_width(random_image(*image_size, seed=0))
    _, ref_w, ref_h = min((abs(cut_w / cut_h - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    ref_h, ref_w = ref_h // multiple * multiple, ref_w // multiple * multiple
    reference_grid = (ref_h // multiple, ref_w // multiple)

    def run(seed: int = 0, output_type: str = "latent", **overrides) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        args = dict(
            image=random_image(*image_size, seed=seed),
            prompt_embeds=torch.randn(1, text_len, FLUX_TEXT_DIM, generator=g),
            pooled_prompt_embeds=torch.randn(1, FLUX_POOLED_DIM, generator=g),
            height=height, width=width, max_area=height * width, num_inference_steps=num_steps,
            generator=g, output_type=output_type,
        )
        if true_cfg:
            args.update(negative_prompt_embeds=torch.randn(1, text_len, FLUX_TEXT_DIM, generator=g),
                        negative_pooled_prompt_embeds=torch.randn(1, FLUX_POOLED_DIM, generator=g),
                        true_cfg_scale=4.0)
        args.update(overrides)
        with torch.no_grad():
            return torch.as_tensor(pipe(**args).images).float()

    def layout(module: str, call: int, facts: CallFacts) -> TokenLayout:
        # double- and single-stream blocks: one kernel call over [text | target | reference]
        t, nt = facts.text_len, facts.target_grid[0] * facts.target_grid[1]
        nr = facts.reference_grid[0] * facts.reference_grid[1]
        n = t + facts.image_len
        return TokenLayout(n, n, range(t, t + nt), facts.target_grid, range(t + nt, t + nt + nr),
                           facts.reference_grid, "kontext", None, True)

    return _flux_system_common(
        pipe, "flux_kontext_true_cfg" if true_cfg else "flux_kontext", num_steps, true_cfg, 1, target_grid,
        reference_grid, run, layout, lambda module: 1,
        {"text_len": text_len, "reference_pixels": (ref_h, ref_w)},
    )


# ----------------------------------------------------------------------------------------------
# 2. Flux with Redux image tokens
# ----------------------------------------------------------------------------------------------


def flux_redux(size=(64, 48), num_steps: int = 2, t5_len: int = 6, redux_side: int = 4, seed: int = 0) -> MMDiTSystem:
    """``FluxPipeline`` (FLUX.1-dev, guidance embedding, no CFG call) whose ``prompt_embeds`` are
    ``[t5_len T5 tokens | redux_side^2 Redux tokens]``: a tiny SigLIP's patch tokens of the
    reference picture through ``ReduxImageEncoder``, appended as ``FluxPriorReduxPipeline``
    does. The Redux tokens sit in the TEXT stream: key positions ``[t5_len, t5_len + n)``."""
    from diffusers import FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    with seeded(seed):
        transformer = tiny_flux_transformer()
        vae = tiny_kl_vae()
        siglip, siglip_processor = tiny_siglip_vision(image_size=8 * redux_side, patch_size=8)
        embedder = ReduxImageEncoder(redux_dim=siglip.config.hidden_size, txt_in_features=FLUX_TEXT_DIM).eval()
    prior = FluxPriorReduxPipeline(image_encoder=siglip, feature_extractor=siglip_processor, image_embedder=embedder)
    pipe = FluxPipeline(scheduler=flux_scheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    height, width = size
    multiple = 2 * pipe.vae_scale_factor
    target_grid = (height // multiple, width // multiple)
    n_redux = redux_side * redux_side

    def redux_tokens(image: Image.Image) -> torch.Tensor:
        """What FluxPriorReduxPipeline appends: ReduxImageEncoder(SigLIP last_hidden_state)."""
        with torch.no_grad():
            return prior.image_embedder(prior.encode_image(image, torch.device("cpu"), 1)).image_embeds

    def run(seed: int = 0, output_type: str = "latent", **overrides) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        t5 = torch.randn(1, t5_len, FLUX_TEXT_DIM, generator=g)
        reference = random_image(40, 40, seed=seed)
        args = dict(
            prompt_embeds=torch.cat([t5, redux_tokens(reference)], dim=1),
            pooled_prompt_embeds=torch.randn(1, FLUX_POOLED_DIM, generator=g),
            height=height, width=width, num_inference_steps=num_steps, generator=g, output_type=output_type,
        )
        args.update(overrides)
        with torch.no_grad():
            return torch.as_tensor(pipe(**args).images).float()

    def layout(module: str, call: int, facts: CallFacts) -> TokenLayout:
        t, nt = facts.text_len, facts.target_grid[0] * facts.target_grid[1]
        n = t + facts.image_len
        redux = range(t - n_redux, t)  # the last n_redux tokens of the text stream
        return TokenLayout(n, n, range(t, t + nt), facts.target_grid, redux, (redux_side, redux_side),
                           "redux", None, True)

    system = _flux_system_common(pipe, "flux_redux", num_steps, False, 1, target_grid, (redux_side, redux_side),
                                 run, layout, lambda module: 1,
                                 {"t5_len": t5_len, "redux_tokens": n_redux, "prior": prior})
    return system


# ----------------------------------------------------------------------------------------------
# 3. Flux with an IP-Adapter
# ----------------------------------------------------------------------------------------------


def _flux_ip_adapter_state_dict(transformer, image_embed_dim: int, num_tokens: int = 4) -> dict:
    """A random IP-Adapter in the layout ``FluxTransformer2DLoadersMixin._load_ip_adapter_weights``
    reads (XLabs' format after the loader's key renaming): ``image_proj`` = an ``ImageProjection``
    (``proj``/``norm``), ``ip_adapter`` = ``<i>.to_k_ip/to_v_ip`` per double-stream block."""
    from diffusers.models.embeddings import ImageProjection

    inner, text_dim = transformer.inner_dim, transformer.config.joint_attention_dim
    proj = ImageProjection(image_embed_dim=image_embed_dim, cross_attention_dim=text_dim, num_image_text_embeds=num_tokens)
    image_proj = {k.replace("image_embeds", "proj"): v.detach().clone() for k, v in proj.state_dict().items()}
    ip_adapter = {}
    for i in range(len(transformer.transformer_blocks)):
        for name in ("to_k_ip", "to_v_ip"):
            layer = nn.Linear(text_dim, inner)
            ip_adapter[f"{i}.{name}.weight"] = layer.weight.detach().clone()
            ip_adapter[f"{i}.{name}.bias"] = layer.bias.detach().clone()
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def flux_ip_adapter(size=(64, 48), num_steps: int = 2, true_cfg: bool = False, text_len: int = 6,
                    seed: int = 0) -> MMDiTSystem:
    """``FluxPipeline`` with a tiny CLIP image encoder and a random IP-Adapter loaded by
    ``pipe.load_ip_adapter(state_dict)``: ``FluxIPAdapterAttnProcessor`` on the double-stream
    blocks (their second kernel call: pre-RoPE image queries over 4 IP tokens, a token list),
    ``FluxAttnProcessor`` on the single-stream blocks. Run with ``ip_adapter_image``; the
    pipeline also encodes an all-zero negative IP image (used only with ``true_cfg``)."""
    with seeded(seed):
        transformer = tiny_flux_transformer()
        vae = tiny_kl_vae()
        clip, clip_processor = tiny_clip_vision()
        state_dict = _flux_ip_adapter_state_dict(transformer, clip.config.projection_dim)
    pipe = FluxPipeline(scheduler=flux_scheduler(), vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer, image_encoder=clip, feature_extractor=clip_processor)
    pipe.load_ip_adapter(state_dict, weight_name="ip_adapter.safetensors", low_cpu_mem_usage=False)
    pipe.set_progress_bar_config(disable=True)
    height, width = size
    multiple = 2 * pipe.vae_scale_factor
    target_grid = (height // multiple, width // multiple)
    num_ip = 4

    def run(seed: int = 0, output_type: str = "latent", **overrides) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        args = dict(
            prompt_embeds=torch.randn(1, text_len, FLUX_TEXT_DIM, generator=g),
            pooled_prompt_embeds=torch.randn(1, FLUX_POOLED_DIM, generator=g),
            ip_adapter_image=random_image(40, 40, seed=seed),
            height=height, width=width, num_inference_steps=num_steps, generator=g, output_type=output_type,
        )
        if true_cfg:
            args.update(negative_prompt_embeds=torch.randn(1, text_len, FLUX_TEXT_DIM, generator=g),
                        negative_pooled_prompt_embeds=torch.randn(1, FLUX_POOLED_DIM, generator=g),
                        true_cfg_scale=4.0)
        args.update(overrides)
        with torch.no_grad():
            return torch.as_tensor(pipe(**args).images).float()

    def is_double(module: str) -> bool:
        return module.startswith("transformer_blocks.")

    def layout(module: str, call: int, facts: CallFacts) -> TokenLayout:
        t, nt = facts.text_len, facts.target_grid[0] * facts.target_grid[1]
        if call == 0:  # the joint attention: [text | target], no reference tokens
            n = t + facts.image_len
            return TokenLayout(n, n, range(t, t + nt), facts.target_grid, None, None, None, None, False)
        # IP branch j = call - 1: image-stream queries (pre-RoPE) over the IP tokens only
        return TokenLayout(facts.image_len, num_ip, range(0, nt), facts.target_grid, range(0, num_ip), None,
                           f"ip{call - 1}", None, False)

    return _flux_system_common(
        pipe, "flux_ip_adapter_true_cfg" if true_cfg else "flux_ip_adapter", num_steps, true_cfg, 1, target_grid,
        None, run, layout, lambda module: 2 if is_double(module) else 1,
        {"text_len": text_len, "ip_tokens": num_ip},
    )


# ----------------------------------------------------------------------------------------------
# 4. SD3 with an IP-Adapter
# ----------------------------------------------------------------------------------------------

SD3_HEADS, SD3_HEAD_DIM, SD3_TEXT_DIM, SD3_POOLED_DIM = 2, 8, 32, 16


def _sd3_ip_adapter_state_dict(transformer, embed_dim: int, num_queries: int, hidden_dim: int = 64) -> dict:
    """A random SD3.5 IP-Adapter in the layout ``SD3Transformer2DLoadersMixin`` reads:
    ``image_proj`` = an ``IPAdapterTimeImageProjection`` (the loader builds 4 blocks with
    ``heads = to_q rows // 64``), ``ip_adapter`` = ``<i>.norm_ip/to_k_ip/to_v_ip/norm_*`` per block."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    inner = transformer.inner_dim
    proj = IPAdapterTimeImageProjection(embed_dim=embed_dim, output_dim=inner, hidden_dim=hidden_dim, depth=4,
                                        dim_head=64, heads=hidden_dim // 64, num_queries=num_queries,
                                        timestep_in_dim=32)
    ip_adapter = {}
    for i in range(len(transformer.attn_processors)):
        proc = SD3IPAdapterJointAttnProcessor2_0(hidden_size=inner, ip_hidden_states_dim=inner,
                                                 head_dim=transformer.config.attention_head_dim,
                                                 timesteps_emb_dim=hidden_dim)
        for k, v in proc.state_dict().items():
            ip_adapter[f"{i}.{k}"] = v.detach().clone()
    return {"image_proj": {k: v.detach().clone() for k, v in proj.state_dict().items()}, "ip_adapter": ip_adapter}


def sd3_ip_adapter(size=(64, 48), num_steps: int = 2, text_len: int = 7, num_queries: int = 16,
                   seed: int = 0) -> MMDiTSystem:
    """``StableDiffusion3Pipeline`` (SD3.5-Large-shaped: RMS qk-norm, no dual attention, 2 blocks,
    the last one ``context_pre_only``), a tiny SigLIP image encoder and a random IP-Adapter
    loaded by ``pipe.load_ip_adapter(state_dict)``. Each block's attention makes two kernel
    calls: the joint attention over ``[image | text]`` and the IP attention of the image queries
    over ``[image | IP tokens]`` (``num_queries`` learned resampler queries: a token list).
    Guidance (``guidance_scale`` 7 by default): one doubled batch ``[uncond, cond]``; the
    unconditional half gets all-zero image features."""
    with seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=SD3_HEAD_DIM,
            num_attention_heads=SD3_HEADS, joint_attention_dim=SD3_TEXT_DIM,
            caption_projection_dim=SD3_HEADS * SD3_HEAD_DIM, pooled_projection_dim=SD3_POOLED_DIM,
            out_channels=4, pos_embed_max_size=16, qk_norm="rms_norm",
        ).eval()
        vae = tiny_kl_vae(shift_factor=0.0609)
        siglip, siglip_processor = tiny_siglip_vision()
        state_dict = _sd3_ip_adapter_state_dict(transformer, siglip.config.hidden_size, num_queries)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=sd3_scheduler(), vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
        image_encoder=siglip, feature_extractor=siglip_processor,
    )
    pipe.load_ip_adapter(state_dict, low_cpu_mem_usage=False)
    pipe.set_progress_bar_config(disable=True)
    height, width = size
    patch = transformer.config.patch_size
    target_grid = (height // pipe.vae_scale_factor // patch, width // pipe.vae_scale_factor // patch)

    def run(seed: int = 0, output_type: str = "latent", **overrides) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        args = dict(
            prompt_embeds=torch.randn(1, text_len, SD3_TEXT_DIM, generator=g),
            pooled_prompt_embeds=torch.randn(1, SD3_POOLED_DIM, generator=g),
            negative_prompt_embeds=torch.randn(1, text_len, SD3_TEXT_DIM, generator=g),
            negative_pooled_prompt_embeds=torch.randn(1, SD3_POOLED_DIM, generator=g),
            ip_adapter_image=random_image(40, 40, seed=seed),
            height=height, width=width, num_inference_steps=num_steps, generator=g, output_type=output_type,
        )
        args.update(overrides)
        with torch.no_grad():
            return torch.as_tensor(pipe(**args).images).float()

    def decode_call(kwargs: dict) -> CallFacts:
        hidden, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        grid = (hidden.shape[-2] // patch, hidden.shape[-1] // patch)
        return CallFacts(batch=hidden.shape[0], timestep=float(kwargs["timestep"].flatten()[0]),
                         text_len=text.shape[1], image_len=grid[0] * grid[1], target_grid=grid,
                         reference_grid=None, text_mask=None)

    def layout(module: str, call: int, facts: CallFacts) -> TokenLayout:
        n = facts.image_len
        if call == 0:  # joint attention [image | text]: no reference tokens
            t = n + facts.text_len
            return TokenLayout(t, t, range(0, n), facts.target_grid, None, None, None, None, False)
        # IP attention: image queries over [image | IP tokens], one softmax
        return TokenLayout(n, n + num_queries, range(0, n), facts.target_grid, range(n, n + num_queries), None,
                           "ip0", None, True)

    attention = {n: m for n, m in transformer.named_modules() if n.endswith(".attn") and "transformer_blocks" in n}
    from diffusers.models.attention_processor import Attention

    excluded = {f"image_proj.{n}" if n else "image_proj": m for n, m in transformer.image_proj.named_modules()
                if isinstance(m, Attention)}
    return MMDiTSystem(
        name="sd3_ip_adapter", pipe=pipe, transformer=transformer, run=run, family="sd3", num_steps=num_steps,
        call_keywords={"latents": "hidden_states", "timestep": "timestep", "text": "encoder_hidden_states",
                       "pooled": "pooled_projections", "attention_kwargs": "joint_attention_kwargs"},
        timestep_scale=1.0, guidance="doubled", call_order=("uncond|cond",), batch=1, target_grid=target_grid,
        reference_grid=None, pixels_per_token=pipe.vae_scale_factor * patch, attention_modules=attention,
        excluded_modules=excluded, decode_call=decode_call, layout=layout, kernel_calls=lambda module: 2,
        extra={"text_len": text_len, "ip_tokens": num_queries},
    )


# ----------------------------------------------------------------------------------------------
# 5. Qwen-Image-Edit
# ----------------------------------------------------------------------------------------------

QWEN_HEADS, QWEN_HEAD_DIM, QWEN_TEXT_DIM = 2, 16, 32


def qwen_image_edit(size=(128, 96), image_size=(40, 56), num_steps: int = 2, zero_cond_t: bool = False,
                    text_lens=(7, 4), negative_lens=(5, 3), true_cfg: bool = True, seed: int = 0) -> MMDiTSystem:
    """``QwenImageEditPipeline``: target ``size = (height, width)`` pixels, an ``image_size =
    (width, height)`` edit picture that the pipeline resizes to about one megapixel
    (``calculate_dimensions(1024 * 1024, w / h)``, multiples of 32) and uses twice: as the
    VL prompt image (skipped here: prompts are embeddings) and as reference latents. Two
    prompts per call, of ``text_lens`` valid tokens padded to the longest (the padding mask is
    passed as ``prompt_embeds_mask``; the pipeline drops an all-ones mask). True CFG (default
    ``true_cfg_scale`` 4 with negative embeddings): two calls per step, conditional first; the
    negative prompts have their own lengths. ``zero_cond_t``: the transformer config flag that
    modulates the reference tokens with timestep 0 (Qwen-Image-Edit-2511)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    with seeded(seed):
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=QWEN_HEAD_DIM,
            num_attention_heads=QWEN_HEADS, joint_attention_dim=QWEN_TEXT_DIM, axes_dims_rope=(4, 6, 6),
            zero_cond_t=zero_cond_t,
        ).eval()
        vae = PatchAutoencoder(factor=16, latent_channels=4, frames=True).eval()
    pipe = QwenImageEditPipeline(scheduler=qwen_scheduler(), vae=vae, text_encoder=None, tokenizer=None,
                                 processor=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    height, width = size
    multiple = 2 * pipe.vae_scale_factor
    target_grid = (height // multiple, width // multiple)
    ref_w, ref_h, _ = calculate_dimensions(1024 * 1024, image_size[0] / image_size[1])
    reference_grid = (ref_h // multiple, ref_w // multiple)

    def embeds(lens, g):
        longest = max(lens)
        x = torch.randn(len(lens), longest, QWEN_TEXT_DIM, generator=g)
        mask = torch.zeros(len(lens), longest, dtype=torch.long)
        for i, n in enumerate(lens):
            mask[i, :n] = 1
            x[i, n:] = 0  # padded rows are zeros, as _get_qwen_prompt_embeds pads them
        return x, mask

    def run(seed: int = 0, output_type: str = "latent", **overrides) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        prompt, mask = embeds(text_lens, g)
        args = dict(image=random_image(*image_size, seed=seed), prompt_embeds=prompt, prompt_embeds_mask=mask,
                    height=height, width=width, num_inference_steps=num_steps, generator=g, output_type=output_type)
        if true_cfg:
            negative, negative_mask = embeds(negative_lens, g)
            args.update(negative_prompt_embeds=negative, negative_prompt_embeds_mask=negative_mask)
        args.update(overrides)
        with torch.no_grad():
            return torch.as_tensor(pipe(**args).images).float()

    def decode_call(kwargs: dict) -> CallFacts:
        hidden, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        shapes = kwargs["img_shapes"][0]  # [(1, h, w) target, (1, h, w) reference, ...]
        mask = kwargs.get("encoder_hidden_states_mask")
        return CallFacts(
            batch=hidden.shape[0], timestep=float(kwargs["timestep"].flatten()[0]), text_len=text.shape[1],
            image_len=hidden.shape[1], target_grid=tuple(shapes[0][1:]),
            reference_grid=tuple(shapes[1][1:]) if len(shapes) > 1 else None,
            text_mask=None if mask is None else mask.bool(),
        )

    def layout(module: str, call: int, facts: CallFacts) -> TokenLayout:
        t, nt = facts.text_len, facts.target_grid[0] * facts.target_grid[1]
        nr = facts.reference_grid[0] * facts.reference_grid[1]
        n = t + facts.image_len
        mask = None
        if facts.text_mask is not None:
            mask = torch.cat([facts.text_mask, torch.ones(facts.batch, facts.image_len, dtype=torch.bool)], dim=1)
        return TokenLayout(n, n, range(t, t + nt), facts.target_grid, range(t + nt, t + nt + nr),
                           facts.reference_grid, "edit image", mask, True)

    attention = {n: m for n, m in transformer.named_modules() if n.endswith(".attn")}
    return MMDiTSystem(
        name="qwen_image_edit_zero_cond_t" if zero_cond_t else "qwen_image_edit", pipe=pipe, transformer=transformer,
        run=run, family="qwen", num_steps=num_steps,
        call_keywords={"latents": "hidden_states", "timestep": "timestep", "text": "encoder_hidden_states",
                       "text_mask": "encoder_hidden_states_mask", "image_shapes": "img_shapes",
                       "guidance": "guidance", "attention_kwargs": "attention_kwargs"},
        timestep_scale=1e-3, guidance="separate" if true_cfg else "none",
        call_order=("cond", "uncond") if true_cfg else ("cond",), batch=len(text_lens), target_grid=target_grid,
        reference_grid=reference_grid, pixels_per_token=multiple, attention_modules=attention, excluded_modules={},
        decode_call=decode_call, layout=layout, kernel_calls=lambda module: 1,
        extra={"text_lens": tuple(text_lens), "negative_lens": tuple(negative_lens), "zero_cond_t": zero_cond_t,
               "reference_pixels": (ref_h, ref_w)},
    )


BUILDERS: dict[str, Callable[[], MMDiTSystem]] = {
    "flux_kontext": flux_kontext,
    "flux_kontext_true_cfg": lambda: flux_kontext(true_cfg=True),
    "flux_redux": flux_redux,
    "flux_ip_adapter": flux_ip_adapter,
    "flux_ip_adapter_true_cfg": lambda: flux_ip_adapter(true_cfg=True),
    "sd3_ip_adapter": sd3_ip_adapter,
    "qwen_image_edit": qwen_image_edit,
    "qwen_image_edit_zero_cond_t": lambda: qwen_image_edit(zero_cond_t=True),
}


def build(name: str) -> MMDiTSystem:
    return BUILDERS[name]()


if __name__ == "__main__":  # smoke run: python tests/pipeline_systems_mmdit.py
    import time

    for key in BUILDERS:
        t0 = time.perf_counter()
        system = build(key)
        t1 = time.perf_counter()
        out = system.run(seed=0)
        t2 = time.perf_counter()
        again = system.run(seed=0)
        print(f"{key:28s} build {t1 - t0:5.2f}s run {t2 - t1:5.2f}s out {tuple(out.shape)} "
              f"finite {bool(torch.isfinite(out).all())} deterministic {torch.equal(out, again)} "
              f"target {system.target_grid} reference {system.reference_grid}")
