"""The embedded default model: the paper's custom architecture at small scale.

A reference-based inpainting model (paper, section 5.1 and figure 3): a diffusers
``UNet2DConditionModel`` with 12 input channels (noisy latent, masked-person latent, pose
latent; 4 each) whose cross-attention reads all patch tokens (a CLS token plus n x n patches)
of an image encoder applied to the reference garment.

Two simplifications keep it small enough to build and run on a laptop CPU:

- the image encoder is a small ViT written here (patch embedding, CLS token, positional
  embedding, transformer encoder layers) instead of CLIP;
- the "VAE" is a fixed pixel-space stand-in, :class:`PixelCodec`: a latent is the image
  average-pooled by ``vae_scale_factor`` (3 colour channels plus 1 channel of local contrast),
  scaled to unit-ish variance; decoding upsamples the colour channels bilinearly.

By default the model loads the trained weights shipped in ``weights.safetensors`` (written by
``python -m i2am_fast.demo.train``); seeded random weights on request or for other configs.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .sample import masked_person

__all__ = ["DemoConfig", "DemoInpaintingModel", "ImagePatchEncoder", "PixelCodec", "build_demo_model"]

WEIGHTS_FILE = os.path.join(os.path.dirname(__file__), "weights.safetensors")


@dataclass
class DemoConfig:
    image_size: tuple[int, int] = (128, 96)  # (H, W) of person images
    vae_scale_factor: int = 4
    reference_size: int = 64  # the garment is resized to this square before the encoder
    patch_size: int = 8  # 64 / 8 = 8 -> 1 CLS + 8 x 8 patch tokens
    encoder_dim: int = 64
    encoder_layers: int = 2
    encoder_heads: int = 4
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    attention_heads: int = 4
    num_train_timesteps: int = 1000


class PixelCodec(nn.Module):
    """A fixed stand-in for a VAE: 4 latent channels at 1/``factor`` resolution, no weights."""

    SCALE = 2.0  # images in [-1, 1] pooled have std ~0.5; latents with std ~1 suit the noise schedule

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> ``[B, 4, H/f, W/f]``."""
        x = image * 2 - 1
        colour = F.avg_pool2d(x, self.factor)
        luminance = x.mean(1, keepdim=True)
        contrast = (F.avg_pool2d(luminance**2, self.factor) - F.avg_pool2d(luminance, self.factor) ** 2).clamp_min(0).sqrt()
        return torch.cat([colour, contrast * 2 - 0.5], dim=1) * self.SCALE

    def decode(self, latent: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``[B, 4, h, w]`` -> ``[B, 3, H, W]`` in [0, 1] (the contrast channel is not drawn)."""
        colour = F.interpolate(latent[:, :3] / self.SCALE, size=size, mode="bilinear", align_corners=False)
        return ((colour + 1) / 2).clamp(0, 1)


class ImagePatchEncoder(nn.Module):
    """A small ViT: ``[B, 3, S, S]`` -> ``[B, 1 + (S/p)^2, dim]`` (CLS token first)."""

    def __init__(self, image_size: int, patch_size: int, dim: int, layers: int, heads: int):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}.")
        self.image_size = image_size
        self.patch = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        tokens = 1 + (image_size // patch_size) ** 2
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.position = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(image * 2 - 1, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.position
        return self.norm(self.encoder(x))


class DemoInpaintingModel(nn.Module):
    """UNet (12 input channels) + patch encoder + pixel codec + DDIM scheduler.

    Behaves like a small diffusers pipeline: it has ``.unet`` and ``.scheduler``, so
    ``i2am_fast.trace(model)`` reads steps from the scheduler, and ``__call__`` runs guided DDIM.
    """

    def __init__(self, config: DemoConfig):
        super().__init__()
        from diffusers import DDIMScheduler, UNet2DConditionModel

        self.config = config
        c = config.block_out_channels
        self.unet = UNet2DConditionModel(
            sample_size=(config.image_size[0] // config.vae_scale_factor, config.image_size[1] // config.vae_scale_factor),
            in_channels=12,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=c,
            down_block_types=("CrossAttnDownBlock2D",) * (len(c) - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(c) - 1),
            cross_attention_dim=config.encoder_dim,
            attention_head_dim=config.attention_heads,  # diffusers' name for the number of heads here
            norm_num_groups=8,
        )
        self.image_encoder = ImagePatchEncoder(config.reference_size, config.patch_size, config.encoder_dim,
                                               config.encoder_layers, config.encoder_heads)
        self.codec = PixelCodec(config.vae_scale_factor)
        self.scheduler = DDIMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule="scaled_linear",
                                       beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False)
        self.vae_scale_factor = config.vae_scale_factor

    @property
    def reference_grid(self) -> tuple[int, int]:
        n = self.config.reference_size // self.config.patch_size
        return n, n

    def conditioning(self, person, inpaint_mask, pose):
        """The 8 conditioning channels: masked-person latent and pose latent."""
        masked = masked_person(person, inpaint_mask[:, None] if inpaint_mask.dim() == 3 else inpaint_mask)
        return torch.cat([self.codec.encode(masked), self.codec.encode(pose)], dim=1)

    @torch.no_grad()
    def __call__(self, person: torch.Tensor, inpaint_mask: torch.Tensor, pose: torch.Tensor, garment: torch.Tensor,
                 *, steps: int = 20, guidance_scale: float = 5.0, seed: int = 0,
                 progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
        """Guided DDIM inpainting. Inputs ``[B, 3, H, W]`` / masks ``[B, H, W]`` in [0, 1];
        returns the generated images ``[B, 3, H, W]``, composited with the person outside the mask."""
        device = next(self.unet.parameters()).device
        person, inpaint_mask, pose, garment = (t.to(device) for t in (person, inpaint_mask, pose, garment))
        batch, _, height, width = person.shape
        cond = self.conditioning(person, inpaint_mask, pose)
        tokens = self.image_encoder(garment)
        no_tokens = torch.zeros_like(tokens)  # the unconditional branch (trained with reference dropout)
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        latents = torch.randn(batch, 4, *cond.shape[-2:], generator=generator).to(device)
        self.scheduler.set_timesteps(steps)
        for i, t in enumerate(self.scheduler.timesteps):
            model_in = torch.cat([torch.cat([latents] * 2), torch.cat([cond] * 2)], dim=1)
            noise = self.unet(model_in, t, encoder_hidden_states=torch.cat([no_tokens, tokens])).sample
            uncond, guided = noise.chunk(2)
            noise = uncond + guidance_scale * (guided - uncond)
            latents = self.scheduler.step(noise, t, latents).prev_sample
            if progress is not None:
                progress(i + 1, steps)
        image = self.codec.decode(latents, (height, width))
        m = inpaint_mask[:, None]
        return image * m + person * (1 - m)


def build_demo_model(seed: int = 0, weights: Optional[str] = None, config: Optional[DemoConfig] = None,
                     pretrained: bool = True) -> DemoInpaintingModel:
    """The demo model: with ``weights`` (a safetensors file written by the training script) when
    given; else, with ``pretrained`` and the default config, the trained weights the package
    ships; else seeded random weights (``torch.manual_seed(seed)`` before construction)."""
    from safetensors.torch import load_file

    config = config or DemoConfig()
    path = weights
    if path is None and pretrained and config == DemoConfig() and os.path.exists(WEIGHTS_FILE):
        path = WEIGHTS_FILE
    torch.manual_seed(seed)
    model = DemoInpaintingModel(config).eval()
    model.weights_source = f"seeded random weights (seed {seed})"
    if path is not None:
        if not os.path.isfile(path):
            raise ValueError(f"weights file {path} does not exist.")
        state = load_file(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path} does not fit the demo model: missing {missing[:5]}, unexpected {unexpected[:5]}.")
        model.weights_source = ("the trained weights shipped with i2am_fast (4000 training steps)" if path == WEIGHTS_FILE
                                else f"weights from {os.path.basename(path)}")
    return model
