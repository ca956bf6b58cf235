"""The diffusers try-on test systems: IDM-VTON-like (a reference UNet whose self-attention inputs
are appended to the try-on UNet's self-attention tokens) and CatVTON-like (person and garment in
one latent, cross-attention removed). See ``tryon_systems.py`` for the overview; the registry of
all builders is there."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from tryon_common import Tokens, TokenLayout, TracedLayer, TryOnSystem, halve, seeded


def ddim_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


def tiny_unet(in_channels: int, cross_attention_dim: int, heads: int = 2) -> UNet2DConditionModel:
    """SD-1.5-shaped, tiny: transformer blocks at the latent grid (down 0, up 2), halved once
    (down 1, up 1) and twice (mid); 7 transformer blocks, ``heads`` heads each."""
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


def unet_level(unet: UNet2DConditionModel, name: str) -> int:
    """How many times the latent grid is halved at a layer of a diffusers UNet2DConditionModel."""
    last = len(unet.config.block_out_channels) - 1
    if name.startswith("mid_block."):
        return last
    block = int(name.split(".")[1])
    return block if name.startswith("down_blocks.") else last - block


def transformer_blocks(unet: nn.Module) -> dict[str, BasicTransformerBlock]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)}


# ----------------------------------------------------------------------------------------------
# 3. IDM-VTON-like
# ----------------------------------------------------------------------------------------------


class GarmentBank:
    """The reference UNet's recorded ``attn1`` inputs, keyed by transformer-block name (the two
    UNets have the same layout, so a name identifies the matching block in both)."""

    def __init__(self):
        self.features: dict[str, torch.Tensor] = {}


class AppendingTransformerBlock(BasicTransformerBlock):
    """A diffusers BasicTransformerBlock (layer-norm variant) that, in role "write", records the
    input of its ``attn1`` (``norm1(hidden_states)``) in the bank, and in role "read" calls its
    ``attn1`` on ``[own ; garment]`` (the bank's tokens for this block) and keeps the output's own
    half, as IDM-VTON's try-on UNet does. ``attn1`` keeps its stock processor."""

    bank: GarmentBank
    bank_key: str
    bank_role: str

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
        if self.norm_type != "layer_norm" or self.pos_embed is not None or self.only_cross_attention or self._chunk_size:
            raise NotImplementedError("only the plain layer-norm block is wired")
        kwargs = dict(cross_attention_kwargs or {})
        own = self.norm1(hidden_states)
        if self.bank_role == "write":
            self.bank.features[self.bank_key] = own
            tokens = own
        else:
            tokens = torch.cat([own, self.bank.features[self.bank_key]], dim=1)
        out = self.attn1(tokens, encoder_hidden_states=None, attention_mask=attention_mask, **kwargs)
        hidden_states = out[:, : hidden_states.shape[1]] + hidden_states
        if self.attn2 is not None:
            norm = self.norm2(hidden_states)
            hidden_states = self.attn2(norm, encoder_hidden_states=encoder_hidden_states,
                                       attention_mask=encoder_attention_mask, **kwargs) + hidden_states
        return self.ff(self.norm3(hidden_states)) + hidden_states


class RecordingProcessor(AttnProcessor2_0):
    """Stock ``AttnProcessor2_0`` that first records its input tokens in the bank (the reference
    UNet's side of the processor variant)."""

    def __init__(self, bank: GarmentBank, key: str):
        super().__init__()
        self.bank, self.key = bank, key

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        self.bank.features[self.key] = hidden_states
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


class GarmentKeysProcessor:
    """Custom ``attn1`` processor of the try-on UNet (processor variant): queries from the own
    tokens, keys and values from ``[own ; garment]``; returns the own tokens' output."""

    def __init__(self, bank: GarmentBank, key: str):
        self.bank, self.key = bank, key

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise NotImplementedError("self-attention on token sequences only")
        if attn.group_norm is not None or attn.spatial_norm is not None or attn.norm_q is not None:
            raise NotImplementedError("no extra norms in these systems")
        b = hidden_states.shape[0]
        context = torch.cat([hidden_states, self.bank.features[self.key]], dim=1)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        d = k.shape[-1] // attn.heads
        q, k, v = (t.view(b, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * d).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class IdmPipeline:
    """IDM-VTON's denoising loop at small scale: per step the reference UNet runs on the clean
    garment latent (same timestep, its own text embedding, batch n), its recorded features are
    doubled as ``[zeros ; features]``, then the try-on UNet runs on the doubled batch. ``trace``
    would find ``.unet`` and ``.scheduler``; ``.unet_encoder`` is the reference network."""

    def __init__(self, unet, unet_encoder, scheduler, bank, latent_grid, garment_grid, num_steps, num_images, text_dim):
        self.unet, self.unet_encoder, self.scheduler, self.bank = unet, unet_encoder, scheduler, bank
        self.latent_grid, self.garment_grid = latent_grid, garment_grid
        self.num_steps, self.num_images, self.text_dim = num_steps, num_images, text_dim

    @torch.no_grad()
    def __call__(self, seed: int = 0, guidance_scale: float = 2.0) -> torch.Tensor:
        n, (h, w), (gh, gw) = self.num_images, self.latent_grid, self.garment_grid
        g = torch.Generator().manual_seed(seed)
        latents = torch.randn(n, 4, h, w, generator=g)
        mask = torch.zeros(n, 1, h, w)
        mask[:, :, h // 4 : (3 * h) // 4, : (2 * w) // 3] = 1.0
        masked = torch.randn(n, 4, h, w, generator=g)
        pose = torch.randn(n, 4, h, w, generator=g)
        garment = torch.randn(n, 4, gh, gw, generator=g)
        text = torch.randn(n, 5, self.text_dim, generator=g)
        negative = torch.randn(n, 5, self.text_dim, generator=g)
        cloth_text = torch.randn(n, 5, self.text_dim, generator=g)
        prompt = torch.cat([negative, text])
        extra = torch.cat([torch.cat([mask] * 2), torch.cat([masked] * 2), torch.cat([pose] * 2)], dim=1)
        self.scheduler.set_timesteps(self.num_steps)
        latents = latents * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            x = torch.cat([self.scheduler.scale_model_input(torch.cat([latents] * 2), t), extra], dim=1)
            self.bank.features.clear()
            self.unet_encoder(garment, t, encoder_hidden_states=cloth_text, return_dict=False)
            self.bank.features.update({k: torch.cat([torch.zeros_like(f), f]) for k, f in self.bank.features.items()})
            eps = self.unet(x, t, encoder_hidden_states=prompt, return_dict=False)[0]
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            latents = self.scheduler.step(eps, t, latents).prev_sample
        self.bank.features.clear()
        return latents


def idm_like(
    latent_grid=(10, 7), garment_grid=(8, 6), num_steps: int = 3, num_images: int = 1,
    appending: str = "block", seed: int = 0,
) -> TryOnSystem:
    """``appending="block"``: the transformer blocks concatenate, ``attn1`` keeps the stock
    processor (queries and keys ``[own ; garment]``). ``"processor"``: stock blocks, the custom
    ``GarmentKeysProcessor`` appends the garment to the keys (queries: own tokens only)."""
    if appending not in ("block", "processor"):
        raise ValueError(f"appending must be 'block' or 'processor', got {appending!r}")
    text_dim = 24
    bank = GarmentBank()
    with seeded(seed):
        unet = tiny_unet(in_channels=13, cross_attention_dim=text_dim)
        unet_encoder = tiny_unet(in_channels=4, cross_attention_dim=text_dim)
    for role, model in (("read", unet), ("write", unet_encoder)):
        for key, block in transformer_blocks(model).items():
            if appending == "block":
                block.__class__ = AppendingTransformerBlock
                block.bank, block.bank_key, block.bank_role = bank, key, role
            else:
                proc = GarmentKeysProcessor(bank, key) if role == "read" else RecordingProcessor(bank, key)
                block.attn1.set_processor(proc)
    scheduler = ddim_scheduler()
    scheduler.set_timesteps(num_steps)
    pipe = IdmPipeline(unet, unet_encoder, scheduler, bank, tuple(latent_grid), tuple(garment_grid), num_steps, num_images, text_dim)

    layers = {}
    for key, block in transformer_blocks(unet).items():
        level = unet_level(unet, key)
        own, ref = halve(latent_grid, level), halve(garment_grid, level)
        n_own, n_ref = own[0] * own[1], ref[0] * ref[1]
        nq = n_own + n_ref if appending == "block" else n_own
        layout = TokenLayout("appended", "garment", nq, n_own + n_ref, Tokens.block(own), Tokens.block(ref, n_own))
        layers[f"{key}.attn1"] = TracedLayer(f"{key}.attn1", block.attn1, "diffusers", "garment-appended", layout)
    return TryOnSystem(
        name=f"idm_{appending}",
        target=pipe,
        denoiser=unet,
        denoiser_call="diffusers",
        run=pipe,
        latent_grid=tuple(latent_grid),
        num_steps=num_steps,
        timesteps=[int(t) for t in scheduler.timesteps],
        schedule="diffusers DDIMScheduler.timesteps after set_timesteps(num_steps); the UNet gets a 0-d tensor",
        n_images=num_images,
        cfg="doubled",
        halves="garment tokens zero (uncond) vs the reference UNet's features (cond); text embedding negative vs "
        "positive; the 13-channel sample is identical in both halves",
        layers=layers,
        sampler=scheduler,
        auxiliary={"unet_encoder": unet_encoder},
        notes="the reference UNet (unet_encoder) runs before each try-on UNet call with the same 0-d timestep and "
        "batch n (not doubled); its own attn1 calls are plain self-attention",
    )


# ----------------------------------------------------------------------------------------------
# 4. CatVTON-like
# ----------------------------------------------------------------------------------------------


class ReturnInputProcessor:
    """CatVTON's replacement for every cross-attention processor: returns its input unchanged (the
    block then adds it to the residual stream: ``h + norm2(h)``)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        return hidden_states


class OwnAttnProcessor2_0(nn.Module):
    """CatVTON ships its own ``AttnProcessor2_0`` (an ``nn.Module``, not diffusers' class) for every
    self-attention; same computation as diffusers' processor, which this one delegates to."""

    def __init__(self, hidden_size=None, cross_attention_dim=None, **kwargs):
        super().__init__()
        self._impl = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        return self._impl(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class CatVtonPipeline:
    """CatVTON's loop at small scale: person and garment latents concatenated along height
    (``stacking="height"``, the published code) or width; UNet input channels ``[noisy (4), mask
    (1), masked (4)]``; guidance as one doubled batch whose unconditional half has the garment
    zeroed in the masked-latent channels; DDIM with ``eta=1`` (noise from the seeded generator).
    Returns the person half of the final latents."""

    def __init__(self, unet, scheduler, latent_grid, stacking, num_steps, num_images):
        self.unet, self.scheduler = unet, scheduler
        self.latent_grid, self.stacking, self.num_steps, self.num_images = latent_grid, stacking, num_steps, num_images

    @property
    def concat_dim(self) -> int:
        return -2 if self.stacking == "height" else -1

    @torch.no_grad()
    def __call__(self, seed: int = 0, guidance_scale: float = 2.5) -> torch.Tensor:
        n, (h, w), dim = self.num_images, self.latent_grid, self.concat_dim
        g = torch.Generator().manual_seed(seed)
        masked_person = torch.randn(n, 4, h, w, generator=g)
        garment = torch.randn(n, 4, h, w, generator=g)
        mask = torch.zeros(n, 1, h, w)
        mask[:, :, h // 4 : (3 * h) // 4, w // 5 : (4 * w) // 5] = 1.0
        masked_concat = torch.cat([masked_person, garment], dim=dim)
        mask_concat = torch.cat([mask, torch.zeros_like(mask)], dim=dim)
        latents = torch.randn(masked_concat.shape, generator=g)
        self.scheduler.set_timesteps(self.num_steps)
        latents = latents * self.scheduler.init_noise_sigma
        masked_concat = torch.cat([torch.cat([masked_person, torch.zeros_like(garment)], dim=dim), masked_concat])
        mask_concat = torch.cat([mask_concat] * 2)
        for t in self.scheduler.timesteps:
            x = self.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            x = torch.cat([x, mask_concat, masked_concat], dim=1)
            eps = self.unet(x, t, encoder_hidden_states=None, return_dict=False)[0]
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            latents = self.scheduler.step(eps, t, latents, eta=1.0, generator=g).prev_sample
        return latents.split(latents.shape[dim] // 2, dim=dim)[0]


def catvton_layout(total: tuple[int, int], stacking: str, name: str) -> TokenLayout:
    """Person half (generated) and garment half (reference) of a layer whose token grid is
    ``total``: top/bottom halves for height stacking (contiguous), left/right halves for width
    stacking (column-strided). The halves must split evenly at every level."""
    H, W = total
    n = H * W
    if stacking == "height":
        if H % 2:
            raise ValueError(f"{name}: {H} rows do not split into person and garment halves")
        half = (H // 2, W)
        return TokenLayout("concatenated", "garment", n, n, Tokens.block(half), Tokens.block(half, half[0] * W))
    if W % 2:
        raise ValueError(f"{name}: {W} columns do not split into person and garment halves")
    half = (H, W // 2)
    return TokenLayout("concatenated", "garment", n, n, Tokens.columns(half, W, 0), Tokens.columns(half, W, W // 2))


def catvton_like(
    latent_grid: Optional[tuple[int, int]] = None, stacking: str = "height", num_steps: int = 3, num_images: int = 1,
    self_attention_processor: str = "diffusers", seed: int = 0,
) -> TryOnSystem:
    """A 9-channel inpainting UNet, cross-attention removed, person and garment stacked by height
    (default latent per half 8x5: total 16x5 -> 8x3 -> 4x2) or width (5x8: total 5x16 -> 3x8 ->
    2x4); the stacked side must stay even at every level. ``self_attention_processor``:
    "diffusers" (diffusers' AttnProcessor2_0) or "own" (``OwnAttnProcessor2_0``, a separate class
    with the same computation, as CatVTON's released code sets it)."""
    if stacking not in ("height", "width"):
        raise ValueError(f"stacking must be 'height' or 'width', got {stacking!r}")
    if self_attention_processor not in ("diffusers", "own"):
        raise ValueError(f"self_attention_processor must be 'diffusers' or 'own', got {self_attention_processor!r}")
    self_cls = AttnProcessor2_0 if self_attention_processor == "diffusers" else OwnAttnProcessor2_0
    latent_grid = tuple(latent_grid or ((8, 5) if stacking == "height" else (5, 8)))
    with seeded(seed):
        unet = tiny_unet(in_channels=9, cross_attention_dim=8)
    unet.set_attn_processor(
        {name: ReturnInputProcessor() if name.endswith("attn2.processor") else self_cls() for name in unet.attn_processors}
    )
    scheduler = ddim_scheduler()
    scheduler.set_timesteps(num_steps)
    pipe = CatVtonPipeline(unet, scheduler, latent_grid, stacking, num_steps, num_images)
    h, w = latent_grid
    total = (2 * h, w) if stacking == "height" else (h, 2 * w)
    layers = {}
    for key, block in transformer_blocks(unet).items():
        name = f"{key}.attn1"
        layout = catvton_layout(halve(total, unet_level(unet, key)), stacking, name)
        layers[name] = TracedLayer(name, block.attn1, "diffusers", "concatenated", layout)
    return TryOnSystem(
        name=f"catvton_{stacking}" + ("_own_processor" if self_attention_processor == "own" else ""),
        target=pipe,
        denoiser=unet,
        denoiser_call="diffusers",
        run=pipe,
        latent_grid=latent_grid,
        num_steps=num_steps,
        timesteps=[int(t) for t in scheduler.timesteps],
        schedule="diffusers DDIMScheduler.timesteps after set_timesteps(num_steps); the UNet gets a 0-d tensor",
        n_images=num_images,
        cfg="doubled",
        halves="the garment half of the masked-latent channels (5..8) is zero in the unconditional half; noisy "
        "latents and mask channels identical; encoder_hidden_states=None",
        layers=layers,
        sampler=scheduler,
    )
