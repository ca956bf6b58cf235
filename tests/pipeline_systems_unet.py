"""Tiny random-weight builds of the UNet-based image-conditioned diffusers pipelines.

Each builder returns a :class:`PipelineSystem`: the pipeline, a ``run(seed)`` that calls it with
its default arguments except tiny sizes and step counts (and ``output_type``), the denoiser
module, and the facts a test needs to compute expected maps outside the tracer: how guidance is
batched, how video frames are laid out in the attention batch, which attention calls read the
reference (and where the reference tokens sit among the keys), which are temporal (queries =
frames) and the latent grid. Nothing is downloaded: weights are seeded random, tokenizers are
written to a temporary folder, IP-Adapters are loaded from in-memory state dicts through
``pipe.load_ip_adapter``.

Pipelines (diffusers 0.42.1): ``paint_by_example``, ``image_variation``, ``sd_ip_adapter``,
``sd_inpaint_ip_adapter``, ``sdxl_ip_adapter``, ``controlnet_ip_adapter``,
``sd_ip_adapter_plus``, ``sd_two_ip_adapters``, ``svd``, ``i2vgen_xl``, ``kandinsky22``.

Attention calls are described per *site*: one module and one SDPA call within its forward
(``part``; an IP-Adapter processor calls SDPA once for the text and once per adapter). A site's
``layout(num_queries, num_keys)`` gives its key layout as consecutive :class:`Tokens` runs.
Attention batch entries are decoded by :class:`BatchLayout` (see ``spatial_entry`` and
``temporal_entry``). Image sizes are chosen so that the latent grid is odd and not square
(6 x 5 for the SD family), so that ceil-halving matters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import diffusers
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import Attention

# ----------------------------------------------------------------------------------------------
# Description records
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tokens:
    """A run of consecutive keys of one attention call: ``[start, start + length)``."""

    name: str  # "text", "image", "ip0", "image_grid", "image_clip", "self", ...
    start: int
    length: int
    grid: Optional[tuple[int, int]] = None  # spatial (h, w), row-major; None: a token list
    reference: bool = False  # a reference source: what the reference map reads

    @property
    def stop(self) -> int:
        return self.start + self.length

    def indices(self) -> list[int]:
        return list(range(self.start, self.stop))


@dataclasses.dataclass
class Site:
    """One kind of attention call: ``module`` (name relative to the denoiser), SDPA call ``part``
    within its forward.

    ``kind``: ``"cross"`` (keys from encoder states), ``"shared"`` (reference keys and the
    layer's own tokens in one softmax: Kandinsky's added KV), ``"self"``, ``"temporal"``
    (queries are frames: excluded by default), ``"projection"`` (attention inside an
    image-projection module, e.g. the IP-Adapter Plus resampler: not the denoiser's own).
    ``queries``: ``"latent"`` (a ceil-halving of the latent grid, row-major), ``"frames"`` or
    ``"learned"`` (a resampler's learned latents).
    ``mapped``: the default trace must map this site (it reads a reference source).
    """

    module: str
    part: int
    processor: str
    kind: str
    queries: str
    mapped: bool
    layout: Callable[[int, int], tuple[Tokens, ...]]  # (num_queries, num_keys) -> key runs

    def references(self, num_queries: int, num_keys: int) -> tuple[Tokens, ...]:
        return tuple(t for t in self.layout(num_queries, num_keys) if t.reference)


@dataclasses.dataclass(frozen=True)
class Entry:
    """What one attention batch entry is."""

    half: str  # "uncond" | "cond" | "none"
    image: int  # image (video) index within its half
    frame: Optional[int] = None  # spatial calls of a video: the frame
    pixel: Optional[int] = None  # temporal calls: the latent position (row-major at the layer grid)


@dataclasses.dataclass
class BatchLayout:
    """How a denoiser call's batch and its attention batches are ordered.

    ``guidance="doubled"``: one denoiser call per step, batch ``[uncond..., cond...]`` (each half
    ``images`` samples). ``sample_halves_identical``: whether the two halves of the denoiser's
    ``sample`` are bit-identical (what today's tracer tests to detect the halves).
    Video (``frames > 1``): the denoiser flattens videos x frames video-major, so a spatial
    attention entry is ``video * frames + frame``; a temporal attention entry is
    ``video * pixels + pixel``, with ``video`` running over both halves.
    """

    guidance: str
    images: int
    frames: int = 1
    sample_halves_identical: bool = True
    halves_differ: str = ""

    @property
    def videos(self) -> int:
        """Samples in one denoiser call (both halves)."""
        return self.images * (2 if self.guidance == "doubled" else 1)

    def _half(self, video: int) -> tuple[str, int]:
        if self.guidance != "doubled":
            return "none", video
        return ("uncond", video) if video < self.images else ("cond", video - self.images)

    def spatial_entry(self, b: int) -> Entry:
        video, frame = divmod(b, self.frames)
        half, image = self._half(video)
        return Entry(half, image, frame if self.frames > 1 else None)

    def temporal_entry(self, b: int, pixels: int) -> Entry:
        video, pixel = divmod(b, pixels)
        half, image = self._half(video)
        return Entry(half, image, None, pixel)

    def spatial_entries(self, half: str = "cond") -> list[int]:
        """Attention batch indices of spatial calls that belong to ``half``."""
        n = self.videos * self.frames
        return [b for b in range(n) if self.spatial_entry(b).half == half]


@dataclasses.dataclass
class PipelineSystem:
    name: str
    pipe: Any
    run: Callable[..., torch.Tensor]  # run(seed=0, output_type=...) -> float32 tensor
    denoiser: nn.Module
    scheduler: Any
    num_steps: int
    latent_grid: tuple[int, int]
    vae_scale_factor: int
    batch: BatchLayout
    sites: list[Site]
    call: str  # how the pipeline calls the denoiser (argument names, positions)
    notes: str = ""
    # the pipeline defaults that shape the batch; run() leaves them as they are (it passes only sizes,
    # step counts, inputs, generator and output_type)
    pipeline_defaults: dict = dataclasses.field(default_factory=dict)

    def site(self, module: str, part: int = 0) -> Site:
        for s in self.sites:
            if s.module == module and s.part == part:
                return s
        raise KeyError((module, part))

    def mapped_sites(self) -> list[Site]:
        return [s for s in self.sites if s.mapped]

    def temporal_modules(self) -> list[str]:
        return sorted({s.module for s in self.sites if s.kind == "temporal"})

    def query_grid(self, num_queries: int) -> tuple[int, int]:
        """The ceil-halving of the latent grid with ``num_queries`` cells."""
        for g in halvings(self.latent_grid):
            if g[0] * g[1] == num_queries:
                return g
        raise ValueError(f"{self.name}: {num_queries} queries match no halving of {self.latent_grid}")


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def seeded(seed: int):
    """Seed torch's global CPU generator for the block, restoring the caller's state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def halvings(grid: tuple[int, int]) -> list[tuple[int, int]]:
    """The grid and its successive ceil-halvings down to 1 x 1."""
    out = [tuple(grid)]
    while out[-1] != (1, 1):
        h, w = out[-1]
        out.append(((h + 1) // 2, (w + 1) // 2))
    return out


def _to_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.float()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x).float()
    raise TypeError(f"pipeline output of type {type(x).__name__}; use output_type='pt', 'np' or 'latent'")


def _random_pil(g: torch.Generator, height: int, width: int) -> Image.Image:
    arr = (torch.rand(height, width, 3, generator=g) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(arr)


def _box_mask(height: int, width: int) -> Image.Image:
    """An inpainting mask (white = fill): the middle half of each side."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
    return Image.fromarray(mask)


def _image_processor(size: int):
    """A CLIP image processor that needs no torchvision."""
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as Processor
    return Processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


_TOKENIZER_DIR: Optional[tempfile.TemporaryDirectory] = None
TEXT_TOKENS = 8  # every tiny tokenizer pads prompts to this many tokens


def tiny_tokenizer():
    """A CLIP BPE tokenizer over lowercase letters (no merges), written to a temp folder."""
    global _TOKENIZER_DIR
    from transformers import CLIPTokenizer

    if _TOKENIZER_DIR is None:
        _TOKENIZER_DIR = tempfile.TemporaryDirectory(prefix="i2am_tiny_clip_")
        letters = "abcdefghijklmnopqrstuvwxyz"
        vocab = {c: i for i, c in enumerate(letters)}
        vocab.update({c + "</w>": len(letters) + i for i, c in enumerate(letters)})
        vocab["<|startoftext|>"] = len(vocab)
        vocab["<|endoftext|>"] = len(vocab)
        with open(os.path.join(_TOKENIZER_DIR.name, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(_TOKENIZER_DIR.name, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
    d = _TOKENIZER_DIR.name
    return CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), model_max_length=TEXT_TOKENS)


def _with_text_model_alias(cls):
    """transformers 5 flattened ``CLIPTextModel`` (no ``.text_model``); diffusers' clip_skip code
    still reads ``text_encoder.text_model.final_layer_norm`` (I2VGenXL does by default:
    ``clip_skip=1``). This subclass answers ``.text_model`` with the model itself."""

    class Aliased(cls):
        @property
        def text_model(self):
            return self

    Aliased.__name__ = Aliased.__qualname__ = cls.__name__
    return Aliased


def tiny_text_encoder(hidden: int, projection: Optional[int] = None, text_model_alias: bool = False):
    """CLIPTextModel (or ...WithProjection when ``projection``) matching :func:`tiny_tokenizer`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = 54  # 26 letters, 26 end-of-word letters, start and end tokens
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TEXT_TOKENS, bos_token_id=vocab - 2,
        eos_token_id=vocab - 1, pad_token_id=vocab - 1, projection_dim=projection or hidden,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    if text_model_alias and not hasattr(cls, "text_model"):
        cls = _with_text_model_alias(cls)
    return cls(config).eval()


def tiny_image_encoder(image_size: int = 32, hidden: int = 16, projection: int = 16, patch: int = 8):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch, projection_dim=projection,
    )
    return CLIPVisionModelWithProjection(config).eval()


def tiny_vae(channels: int = 8, groups: int = 4) -> AutoencoderKL:
    """Four levels: vae_scale_factor 8, as the real models."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(channels,) * 4, norm_num_groups=groups, sample_size=64,
    ).eval()


def tiny_sd_unet(in_channels: int = 4, cross_attention_dim: int = 32, **extra) -> UNet2DConditionModel:
    """SD-1.5-shaped: cross-attention at the latent grid, halved once, and (mid) twice; 2 heads."""
    return UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=2, norm_num_groups=8, **extra,
    ).eval()


def ddim() -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


def _processor_name(module: Attention) -> str:
    return type(module.processor).__name__


def _text(nq: int, nk: int) -> tuple[Tokens, ...]:
    return (Tokens("text", 0, nk),)


def _self(nq: int, nk: int) -> tuple[Tokens, ...]:
    return (Tokens("self", 0, nk),)


def _resampler(nq: int, nk: int) -> tuple[Tokens, ...]:
    """IP-Adapter Plus resampler attention: keys = [CLIP features ; the learned latents]."""
    return (Tokens("image_features", 0, nk - nq), Tokens("latents", nk - nq, nq))


def _all_reference(name: str, grid: Optional[tuple[int, int]] = None):
    def layout(nq: int, nk: int) -> tuple[Tokens, ...]:
        return (Tokens(name, 0, nk, grid, reference=True),)

    return layout


def _unet2d_sites(unet: nn.Module, cross: Callable[[str, Attention], list[Site]]) -> list[Site]:
    """Sites of a UNet2DConditionModel: attn1 self-attention, attn2 by ``cross``, attention
    inside ``encoder_hid_proj`` (IP-Adapter Plus resampler) as projection."""
    sites: list[Site] = []
    for name, m in unet.named_modules():
        if not isinstance(m, Attention):
            continue
        proc = _processor_name(m)
        if name.startswith("encoder_hid_proj."):
            # the resampler's attention: queries = 16 learned latents, keys = [image feats ; latents]
            sites.append(Site(name, 0, proc, "projection", "learned", False, _resampler))
        elif name.endswith("attn1"):
            sites.append(Site(name, 0, proc, "self", "latent", False, _self))
        else:
            sites.extend(cross(name, m))
    return sites


def _ip_adapter_cross(sources: list[tuple[str, int]]):
    """attn2 with IPAdapterAttnProcessor2_0: part 0 = text, part 1 + j = IP-Adapter j (a token list)."""

    def cross(name: str, m: Attention) -> list[Site]:
        proc = _processor_name(m)
        out = [Site(name, 0, proc, "cross", "latent", False, _text)]
        for j, (source, tokens) in enumerate(sources):
            def layout(nq, nk, source=source, tokens=tokens):
                assert nk == tokens, (source, nk, tokens)
                return (Tokens(source, 0, nk, None, reference=True),)

            out.append(Site(name, 1 + j, proc, "cross", "latent", True, layout))
        return out

    return cross


# ----------------------------------------------------------------------------------------------
# IP-Adapter state dicts in the original (non-diffusers) layout, loaded by pipe.load_ip_adapter
# ----------------------------------------------------------------------------------------------


def _ip_cross_attention_shapes(unet: UNet2DConditionModel) -> list[int]:
    """Inner width of each cross-attention, in ``unet.attn_processors`` order (the loader's key ids)."""
    widths = []
    for name in unet.attn_processors:
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        widths.append(unet.get_submodule(name[: -len(".processor")]).to_q.out_features)
    return widths


def _ip_adapter_weights(unet: UNet2DConditionModel, g: torch.Generator) -> dict[str, torch.Tensor]:
    cad = unet.config.cross_attention_dim
    out = {}
    for i, width in enumerate(_ip_cross_attention_shapes(unet)):
        key_id = 1 + 2 * i
        out[f"{key_id}.to_k_ip.weight"] = torch.randn(width, cad, generator=g) / cad**0.5
        out[f"{key_id}.to_v_ip.weight"] = torch.randn(width, cad, generator=g) / cad**0.5
    return out


def plain_ip_adapter_state_dict(unet: UNet2DConditionModel, image_embed_dim: int, g: torch.Generator) -> dict:
    """An IP-Adapter (4 tokens from one global image embedding) as ``ip-adapter_sd15.bin`` lays it out."""
    cad = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": torch.randn(4 * cad, image_embed_dim, generator=g) / image_embed_dim**0.5,
        "proj.bias": torch.randn(4 * cad, generator=g) * 0.1,
        "norm.weight": 1 + 0.1 * torch.randn(cad, generator=g),
        "norm.bias": 0.1 * torch.randn(cad, generator=g),
    }
    return {"image_proj": image_proj, "ip_adapter": _ip_adapter_weights(unet, g)}


def plus_ip_adapter_state_dict(unet: UNet2DConditionModel, embed_dims: int, g: torch.Generator,
                               num_queries: int = 16, hidden_dims: int = 32, depth: int = 4) -> dict:
    """An IP-Adapter Plus (Resampler: ``num_queries`` learned queries over CLIP patch features) in
    the original layout; the loader reads heads = to_q rows // 64."""
    cad = unet.config.cross_attention_dim
    inner, ff = 64, 4 * hidden_dims

    def w(o, i):
        return torch.randn(o, i, generator=g) / i**0.5

    def ln(n):
        return 1 + 0.1 * torch.randn(n, generator=g), 0.1 * torch.randn(n, generator=g)

    sd = {
        "latents": torch.randn(1, num_queries, hidden_dims, generator=g) / hidden_dims**0.5,
        "proj_in.weight": w(hidden_dims, embed_dims), "proj_in.bias": 0.1 * torch.randn(hidden_dims, generator=g),
        "proj_out.weight": w(cad, hidden_dims), "proj_out.bias": 0.1 * torch.randn(cad, generator=g),
    }
    sd["norm_out.weight"], sd["norm_out.bias"] = ln(cad)
    for i in range(depth):
        p = f"layers.{i}"
        sd[f"{p}.0.norm1.weight"], sd[f"{p}.0.norm1.bias"] = ln(hidden_dims)
        sd[f"{p}.0.norm2.weight"], sd[f"{p}.0.norm2.bias"] = ln(hidden_dims)
        sd[f"{p}.0.to_q.weight"] = w(inner, hidden_dims)
        sd[f"{p}.0.to_kv.weight"] = w(2 * inner, hidden_dims)
        sd[f"{p}.0.to_out.weight"] = w(hidden_dims, inner)
        sd[f"{p}.1.0.weight"], sd[f"{p}.1.0.bias"] = ln(hidden_dims)
        sd[f"{p}.1.1.weight"] = w(ff, hidden_dims)
        sd[f"{p}.1.3.weight"] = w(hidden_dims, ff)
    return {"image_proj": sd, "ip_adapter": _ip_adapter_weights(unet, g)}


def _load_ip_adapters(pipe, state_dicts: list[dict]) -> None:
    n = len(state_dicts)
    pipe.load_ip_adapter(state_dicts, subfolder=[None] * n, weight_name=[None] * n, low_cpu_mem_usage=False)


# ----------------------------------------------------------------------------------------------
# Paint-by-Example
# ----------------------------------------------------------------------------------------------

SD_IMAGE = (48, 40)  # pixels (h, w) -> a 6 x 5 latent: odd and not square


def paint_by_example(num_steps: int = 3, seed: int = 0) -> PipelineSystem:
    """``PaintByExamplePipeline``: one reference token (the example's CLS through the mapper and
    projection) in every attn2; 9-channel UNet (noisy, mask, masked-image latents)."""
    from transformers import CLIPVisionConfig

    from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder

    proj = 32
    with seeded(seed):
        unet = tiny_sd_unet(in_channels=9, cross_attention_dim=proj)
        vae = tiny_vae()
        config = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=5, num_attention_heads=2,
                                  image_size=32, patch_size=8, projection_dim=proj)
        image_encoder = PaintByExampleImageEncoder(config, proj_size=proj).eval()
    pipe = diffusers.PaintByExamplePipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=ddim(), safety_checker=None,
        feature_extractor=_image_processor(32), requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    H, W = SD_IMAGE

    def run(seed: int = 0, output_type: str = "pt") -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        image, example = _random_pil(g, H, W), _random_pil(g, 32, 32)
        mask = _box_mask(H, W)
        with seeded(seed):
            out = pipe(example_image=example, image=image, mask_image=mask, height=H, width=W,
                       num_inference_steps=num_steps, generator=g, output_type=output_type)
        return _to_tensor(out.images)

    def cross(name, m):
        return [Site(name, 0, _processor_name(m), "cross", "latent", True, _all_reference("image"))]

    return PipelineSystem(
        name="paint_by_example", pipe=pipe, run=run, denoiser=unet, scheduler=pipe.scheduler,
        num_steps=num_steps, latent_grid=(H // 8, W // 8), vae_scale_factor=pipe.vae_scale_factor,
        batch=BatchLayout("doubled", 1, halves_differ="encoder_hidden_states: uncond = the learned "
                          "image_encoder.uncond_vector, cond = the example embedding; sample halves identical"),
        sites=_unet2d_sites(unet, cross),
        call="unet(latent_model_input, t, encoder_hidden_states=image_embeddings).sample; "
             "latent_model_input = cat([cat([latents]*2) scaled, masked_image_latents, mask], dim=1)",
        pipeline_defaults={"guidance_scale": 5.0},
    )


# ----------------------------------------------------------------------------------------------
# Stable Diffusion image variation
# ----------------------------------------------------------------------------------------------


def image_variation(num_steps: int = 3, seed: int = 0) -> PipelineSystem:
    """``StableDiffusionImageVariationPipeline``: one reference token (CLIP image_embeds) in attn2;
    unconditional embedding = zeros."""
    proj = 32
    with seeded(seed):
        unet = tiny_sd_unet(cross_attention_dim=proj)
        vae = tiny_vae()
        image_encoder = tiny_image_encoder(32, hidden=16, projection=proj)
    pipe = diffusers.StableDiffusionImageVariationPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=ddim(), safety_checker=None,
        feature_extractor=_image_processor(32), requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    H, W = SD_IMAGE

    def run(seed: int = 0, output_type: str = "pt") -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        image = _random_pil(g, 40, 44)
        with seeded(seed):
            out = pipe(image=image, height=H, width=W, num_inference_steps=num_steps, generator=g,
                       output_type=output_type)
        return _to_tensor(out.images)

    def cross(name, m):
        return [Site(name, 0, _processor_name(m), "cross", "latent", True, _all_reference("image"))]

    return PipelineSystem(
        name="image_variation", pipe=pipe, run=run, denoiser=unet, scheduler=pipe.scheduler,
        num_steps=num_steps, latent_grid=(H // 8, W // 8), vae_scale_factor=pipe.vae_scale_factor,
        batch=BatchLayout("doubled", 1, halves_differ="encoder_hidden_states: uncond = zeros (1 token), "
                          "cond = CLIP image_embeds; sample halves identical"),
        sites=_unet2d_sites(unet, cross),
        call="unet(latent_model_input, t, encoder_hidden_states=image_embeddings).sample",
        pipeline_defaults={"guidance_scale": 7.5},
    )


# ----------------------------------------------------------------------------------------------
# SD-family pipelines with IP-Adapters
# ----------------------------------------------------------------------------------------------

IP_IMAGE = 32  # the IP-Adapter image encoder's input size
IP_EMBED = 16  # its projection_dim (the plain IP-Adapter's image_embed_dim)
IP_HIDDEN = 24  # its hidden size (the Plus resampler's embed_dims)


def _ip_sources(kinds: list[str]) -> list[tuple[str, int]]:
    return [(f"ip{j}", 4 if kind == "plain" else 16) for j, kind in enumerate(kinds)]


def _add_ip_adapters(pipe, unet, kinds: list[str], g: torch.Generator) -> None:
    sds = [
        plain_ip_adapter_state_dict(unet, IP_EMBED, g) if kind == "plain" else plus_ip_adapter_state_dict(unet, IP_HIDDEN, g)
        for kind in kinds
    ]
    _load_ip_adapters(pipe, sds)


def _ip_batch(kinds: list[str], extra: str = "") -> BatchLayout:
    parts = []
    for j, kind in enumerate(kinds):
        if kind == "plain":
            parts.append(f"ip{j}: uncond image_embeds = zeros (through the projection: its bias/norm)")
        else:
            parts.append(f"ip{j}: uncond = CLIP hidden_states[-2] of an all-zero image")
    return BatchLayout("doubled", 1, halves_differ="; ".join(["prompt_embeds: negative prompt vs prompt"] + parts
                                                             + ([extra] if extra else [])))


def _sd_pipeline_with_ip(name: str, kinds: list[str], num_steps: int, seed: int, *, inpaint: bool = False,
                         controlnet: bool = False) -> PipelineSystem:
    text_dim = 32
    with seeded(seed):
        unet = tiny_sd_unet(in_channels=9 if inpaint else 4, cross_attention_dim=text_dim)
        vae = tiny_vae()
        text_encoder = tiny_text_encoder(text_dim)
        image_encoder = tiny_image_encoder(IP_IMAGE, hidden=IP_HIDDEN, projection=IP_EMBED)
        control = None
        if controlnet:
            control = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8)).eval()
    common = dict(vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(), unet=unet, scheduler=ddim(),
                  safety_checker=None, feature_extractor=_image_processor(IP_IMAGE), image_encoder=image_encoder,
                  requires_safety_checker=False)
    if controlnet:
        pipe = diffusers.StableDiffusionControlNetPipeline(controlnet=control, **common)
    elif inpaint:
        pipe = diffusers.StableDiffusionInpaintPipeline(**common)
    else:
        pipe = diffusers.StableDiffusionPipeline(**common)
    pipe.set_progress_bar_config(disable=True)
    _add_ip_adapters(pipe, unet, kinds, torch.Generator().manual_seed(seed + 1))
    H, W = SD_IMAGE

    def run(seed: int = 0, output_type: str = "pt") -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        ip_images = [_random_pil(g, 36, 30) for _ in kinds]
        kwargs = dict(prompt="a cat", height=H, width=W, num_inference_steps=num_steps, generator=g,
                      output_type=output_type, ip_adapter_image=ip_images if len(kinds) > 1 else ip_images[0])
        if inpaint:
            kwargs["image"] = _random_pil(g, H, W)
            kwargs["mask_image"] = _box_mask(H, W)
        if controlnet:
            kwargs["image"] = _random_pil(g, H, W)
        with seeded(seed):
            out = pipe(**kwargs)
        return _to_tensor(out.images)

    sources = _ip_sources(kinds)
    extra = ""
    if inpaint:
        extra = "mask and masked-image latents concatenated to both halves alike"
    if controlnet:
        extra = "controlnet residuals computed on the doubled batch (the controlnet sees text only)"
    call = ("unet(latent_model_input, t, encoder_hidden_states=prompt_embeds, timestep_cond=None, "
            "cross_attention_kwargs=None, added_cond_kwargs={'image_embeds': [per adapter [2B, 1, ...]]}"
            + (", down_block_additional_residuals=..., mid_block_additional_residual=..." if controlnet else "")
            + ").sample")
    return PipelineSystem(
        name=name, pipe=pipe, run=run, denoiser=unet, scheduler=pipe.scheduler, num_steps=num_steps,
        latent_grid=(H // 8, W // 8), vae_scale_factor=pipe.vae_scale_factor, batch=_ip_batch(kinds, extra),
        sites=_unet2d_sites(unet, _ip_adapter_cross(sources)), call=call,
        notes="IP-Adapter loaded with pipe.load_ip_adapter(state_dict); unet.encoder_hid_proj = "
              "MultiIPAdapterImageProjection; every attn2 -> IPAdapterAttnProcessor2_0 (text part 0, adapter j part 1+j)",
        pipeline_defaults={"guidance_scale": 7.5},
    )


def sd_ip_adapter(num_steps: int = 3, seed: int = 0) -> PipelineSystem:
    """SD 1.5-shaped text-to-image with a plain IP-Adapter (4 tokens from one global embedding)."""
    return _sd_pipeline_with_ip("sd_ip_adapter", ["plain"], num_steps, seed)


def sd_ip_adapter_plus(num_steps: int = 3, seed: int = 0) -> PipelineSystem:
    """SD with IP-Adapter Plus: a Resampler makes 16 learned-query tokens from CLIP patch features."""
    return _sd_pipeline_with_ip("sd_ip_adapter_plus", ["plus"], num_steps, seed)


def sd_two_ip_adapters(num_steps: int = 3, seed: int = 0) -> PipelineSystem:
    """SD with two IP-Adapters at once: a plain one (4 tokens) and a Plus one (16 tokens)."""
    return _sd_pipeline_with_ip("sd_two_ip_adapters", ["plain", "plus"], num_steps, seed)


def sd_inpaint_ip_adapter(num_steps: int = 3, seed: int = 0) -> PipelineSystem:
    """``StableDiffusionInpaintPipeline`` (9-channel UNet) with a plain IP-Adapter."""
    return _sd_pipeline_with_ip("sd_inpaint_ip_adapter", ["plain"], num_steps, seed, inpaint=True)


def controlnet_ip_adapter(num_steps: int = 3, seed: int = 0) -> PipelineSystem:
    """``StableDiffusionControlNetPipeline`` with a plain IP-Adapter on the UNet."""
    return _sd_pipeline_with_ip("controlnet_ip_adapter", ["plain"], num_steps, seed, controlnet=True)


def sdxl_ip_adapter(num_steps: int = 3, seed: int = 0) -> PipelineSystem:
    """``StableDiffusionXLPipeline`` (two text encoders, text_time added embedding, no attention at
    the latent grid) with a plain IP-Adapter."""
    from transformers import CLIPTextModelWithProjection  # noqa: F401  (tiny_text_encoder builds it)

    t1, t2 = 16, 16
    with seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=t1 + t2, attention_head_dim=(2, 2, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + t2, norm_num_groups=8,
        ).eval()
        vae = tiny_vae()
        text_encoder = tiny_text_encoder(t1)
        text_encoder_2 = tiny_text_encoder(t2, projection=t2)
        image_encoder = tiny_image_encoder(IP_IMAGE, hidden=IP_HIDDEN, projection=IP_EMBED)
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(), unet=unet, scheduler=scheduler, image_encoder=image_encoder,
        feature_extractor=_image_processor(IP_IMAGE), add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    _add_ip_adapters(pipe, unet, ["plain"], torch.Generator().manual_seed(seed + 1))
    H, W = SD_IMAGE

    def run(seed: int = 0, output_type: str = "pt") -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        with seeded(seed):
            out = pipe(prompt="a cat", ip_adapter_image=_random_pil(g, 36, 30), height=H, width=W,
                       num_inference_steps=num_steps, generator=g, output_type=output_type)
        return _to_tensor(out.images)

    return PipelineSystem(
        name="sdxl_ip_adapter", pipe=pipe, run=run, denoiser=unet, scheduler=scheduler, num_steps=num_steps,
        latent_grid=(H // 8, W // 8), vae_scale_factor=pipe.vae_scale_factor,
        batch=_ip_batch(["plain"], "negative prompt embeds are zeros (force_zeros_for_empty_prompt); "
                        "add_text_embeds/add_time_ids doubled alike"),
        sites=_unet2d_sites(unet, _ip_adapter_cross(_ip_sources(["plain"]))),
        call="unet(latent_model_input, t, encoder_hidden_states=prompt_embeds, timestep_cond=None, "
             "cross_attention_kwargs=None, added_cond_kwargs={'text_embeds', 'time_ids', 'image_embeds'}).sample; "
             "t is a float timestep of EulerDiscreteScheduler",
        pipeline_defaults={"guidance_scale": 5.0},
    )


# ----------------------------------------------------------------------------------------------
# Stable Video Diffusion
# ----------------------------------------------------------------------------------------------


def svd(num_steps: int = 2, num_frames: int = 3, seed: int = 0) -> PipelineSystem:
    """``StableVideoDiffusionPipeline``: spatial cross-attention to ONE token (the CLIP image
    embedding) per frame, temporal self- and cross-attention over frames. Guidance: doubled
    batch whose halves of ``sample`` differ (zero image latents concatenated to the uncond half)."""
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel

    clip = 32
    with seeded(seed):
        unet = UNetSpatioTemporalConditionModel(
            sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            cross_attention_dim=clip, num_attention_heads=(2, 4), addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=3 * 8, num_frames=num_frames,
        ).eval()
        vae = AutoencoderKLTemporalDecoder(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            block_out_channels=(32,) * 4, layers_per_block=1, latent_channels=4,
        ).eval()
        image_encoder = tiny_image_encoder(224, hidden=16, projection=clip, patch=32)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        interpolation_type="linear", prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
        steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
    )
    pipe = diffusers.StableVideoDiffusionPipeline(vae=vae, image_encoder=image_encoder, unet=unet,
                                                  scheduler=scheduler, feature_extractor=_image_processor(224))
    pipe.set_progress_bar_config(disable=True)
    H, W = SD_IMAGE

    def run(seed: int = 0, output_type: str = "pt") -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        image = _random_pil(g, H, W)
        with seeded(seed):
            out = pipe(image, height=H, width=W, num_frames=num_frames, num_inference_steps=num_steps,
                       generator=g, output_type=output_type)
        return _to_tensor(out.frames)

    sites = []
    for name, m in unet.named_modules():
        if not isinstance(m, Attention):
            continue
        proc = _processor_name(m)
        temporal = ".temporal_transformer_blocks." in name
        if name.endswith("attn1"):
            sites.append(Site(name, 0, proc, "temporal" if temporal else "self", "frames" if temporal else "latent",
                              False, _self))
        elif temporal:  # attn2 of the time mixer: queries = frames, key = the first frame's image embedding
            sites.append(Site(name, 0, proc, "temporal", "frames", False, _all_reference("image")))
        else:
            sites.append(Site(name, 0, proc, "cross", "latent", True, _all_reference("image")))
    return PipelineSystem(
        name="svd", pipe=pipe, run=run, denoiser=unet, scheduler=scheduler, num_steps=num_steps,
        latent_grid=(H // 8, W // 8), vae_scale_factor=pipe.vae_scale_factor,
        batch=BatchLayout("doubled", 1, frames=num_frames, sample_halves_identical=False,
                          halves_differ="sample = cat([cat([latents]*2) scaled, image_latents], dim=2) with "
                                        "image_latents = [zeros, vae latents]; encoder_hidden_states = [zeros, "
                                        "CLIP image_embeds] (1 token); added_time_ids equal"),
        sites=sites,
        call="unet(latent_model_input [2B, F, 8, h, w], t (float 0-dim tensor, 0.25*log(sigma)), "
             "encoder_hidden_states=image_embeddings [2B, 1, C], added_time_ids=[2B, 3], return_dict=False)[0]",
        notes="inside the UNet: sample.flatten(0, 1) -> [2B*F, ...]; encoder_hidden_states.repeat_interleave(F)",
        pipeline_defaults={"min_guidance_scale": 1.0, "max_guidance_scale": 3.0},
    )


# ----------------------------------------------------------------------------------------------
# I2VGen-XL
# ----------------------------------------------------------------------------------------------

I2VGEN_GRID = (8, 8)  # image_latents_context_embedding: AdaptiveAvgPool2d(32) -> two stride-2 convs
I2VGEN_CLIP_TOKENS = 4  # context_embedding(image_embeds) viewed as in_channels (4) tokens


def i2vgen_xl(num_steps: int = 2, num_frames: int = 3, seed: int = 0) -> PipelineSystem:
    """``I2VGenXLPipeline``: spatial cross-attention over ``[text (8) | image 8x8 | CLIP 4]``; temporal
    self-attention (transformer_in, temp_attentions, image_latents_temporal_encoder)."""
    from diffusers.models.unets import I2VGenXLUNet

    cad = 16
    with seeded(seed):
        unet = I2VGenXLUNet(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
            cross_attention_dim=cad, attention_head_dim=2, num_attention_heads=None, norm_num_groups=4,
        ).eval()
        vae = tiny_vae()
        text_encoder = tiny_text_encoder(cad, text_model_alias=True)
        image_encoder = tiny_image_encoder(32, hidden=16, projection=cad)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    pipe = diffusers.I2VGenXLPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(),
                                      image_encoder=image_encoder, feature_extractor=_image_processor(32),
                                      unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    H, W = SD_IMAGE

    def run(seed: int = 0, output_type: str = "pt") -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        image = _random_pil(g, H, W)
        with seeded(seed):  # prepare_image_latents samples the VAE posterior without the generator
            out = pipe(prompt="a cat", image=image, height=H, width=W, num_frames=num_frames,
                       num_inference_steps=num_steps, generator=g, output_type=output_type)
        return _to_tensor(out.frames)

    def cross_layout(nq: int, nk: int) -> tuple[Tokens, ...]:
        grid_n = I2VGEN_GRID[0] * I2VGEN_GRID[1]
        text = nk - grid_n - I2VGEN_CLIP_TOKENS
        assert text >= 0, nk
        return (
            Tokens("text", 0, text),
            Tokens("image_grid", text, grid_n, I2VGEN_GRID, reference=True),
            Tokens("image_clip", text + grid_n, I2VGEN_CLIP_TOKENS, None, reference=True),
        )

    sites = []
    for name, m in unet.named_modules():
        if not isinstance(m, Attention):
            continue
        proc = _processor_name(m)
        temporal = name.startswith(("transformer_in.", "image_latents_temporal_encoder")) or ".temp_attentions." in name
        if temporal:
            sites.append(Site(name, 0, proc, "temporal", "frames", False, _self))
        elif name.endswith("attn1"):
            sites.append(Site(name, 0, proc, "self", "latent", False, _self))
        else:
            sites.append(Site(name, 0, proc, "cross", "latent", True, cross_layout))
    return PipelineSystem(
        name="i2vgen_xl", pipe=pipe, run=run, denoiser=unet, scheduler=scheduler, num_steps=num_steps,
        latent_grid=(H // 8, W // 8), vae_scale_factor=pipe.vae_scale_factor,
        batch=BatchLayout("doubled", 1, frames=num_frames, sample_halves_identical=True,
                          halves_differ="encoder_hidden_states: negative prompt vs prompt; image_embeddings: zeros "
                                        "vs CLIP (the 4 CLIP tokens = context_embedding(zeros), not zero); "
                                        "image_latents identical in both halves (so the 8x8 image tokens are too)"),
        sites=sites,
        call="unet(latent_model_input [2B, 4, F, h, w], t, encoder_hidden_states=prompt_embeds, fps=[2B], "
             "image_latents=[2B, 4, F, h, w], image_embeddings=[2B, 1, C], cross_attention_kwargs=None, "
             "return_dict=False)[0]",
        notes="inside the UNet: sample.permute(0, 2, 1, 3, 4).reshape(2B*F, ...); context_emb "
              "[2B, text + 64 + 4, C].repeat_interleave(F)",
        pipeline_defaults={"guidance_scale": 9.0},
    )


# ----------------------------------------------------------------------------------------------
# Kandinsky 2.2 (decoder)
# ----------------------------------------------------------------------------------------------

KANDINSKY_TOKENS = 32  # ImageProjection's default num_image_text_embeds (encoder_hid_dim_type="image_proj")


def kandinsky22(num_steps: int = 3, seed: int = 0) -> PipelineSystem:
    """``KandinskyV22Pipeline`` with image_embeds passed directly (no prior): every attention is
    ``AttnAddedKVProcessor2_0``: keys = ``[32 image-embedding tokens | the layer's own h*w tokens]``
    in ONE softmax."""
    from diffusers import VQModel

    emb = 32
    with seeded(seed):
        unet = UNet2DConditionModel(
            in_channels=4, out_channels=8, addition_embed_type="image",
            down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
            up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
            encoder_hid_dim=emb, encoder_hid_dim_type="image_proj", cross_attention_dim=32, attention_head_dim=4,
            resnet_time_scale_shift="scale_shift", class_embed_type=None,
        ).eval()
        movq = VQModel(
            block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
            up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), in_channels=3, out_channels=3,
            latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
            num_vq_embeddings=12, vq_embed_dim=4,
        ).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                              thresholding=False)
    pipe = diffusers.KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq)
    pipe.set_progress_bar_config(disable=True)
    H, W = 24, 20  # movq_scale_factor 2: latent = ceil(H / 4) * 2 x ceil(W / 4) * 2 = 12 x 10

    def run(seed: int = 0, output_type: str = "pt") -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        image_embeds = torch.randn(1, emb, generator=g)
        negative = torch.randn(1, emb, generator=g)
        with seeded(seed):
            out = pipe(image_embeds=image_embeds, negative_image_embeds=negative, height=H, width=W,
                       num_inference_steps=num_steps, generator=g, output_type=output_type)
        return _to_tensor(out.images)

    def shared_layout(nq: int, nk: int) -> tuple[Tokens, ...]:
        assert nk == KANDINSKY_TOKENS + nq, (nq, nk)
        return (Tokens("image", 0, KANDINSKY_TOKENS, None, reference=True), Tokens("self", KANDINSKY_TOKENS, nq))

    sites = [Site(name, 0, _processor_name(m), "shared", "latent", True, shared_layout)
             for name, m in unet.named_modules() if isinstance(m, Attention)]
    sf = pipe.movq_scale_factor
    return PipelineSystem(
        name="kandinsky22", pipe=pipe, run=run, denoiser=unet, scheduler=scheduler, num_steps=num_steps,
        latent_grid=(-(-H // sf**2) * sf, -(-W // sf**2) * sf), vae_scale_factor=sf,
        batch=BatchLayout("doubled", 1, halves_differ="added_cond_kwargs['image_embeds'] = [negative, positive]; "
                          "sample halves identical; encoder_hidden_states=None (the UNet projects image_embeds "
                          "to 32 tokens itself)"),
        sites=sites,
        call="unet(sample=latent_model_input, timestep=t, encoder_hidden_states=None, "
             "added_cond_kwargs={'image_embeds': [2B, C]}, return_dict=False)[0] (all keyword)",
        pipeline_defaults={"guidance_scale": 4.0},
    )


BUILDERS: dict[str, Callable[[], PipelineSystem]] = {
    "paint_by_example": paint_by_example,
    "image_variation": image_variation,
    "sd_ip_adapter": sd_ip_adapter,
    "sd_inpaint_ip_adapter": sd_inpaint_ip_adapter,
    "sdxl_ip_adapter": sdxl_ip_adapter,
    "controlnet_ip_adapter": controlnet_ip_adapter,
    "sd_ip_adapter_plus": sd_ip_adapter_plus,
    "sd_two_ip_adapters": sd_two_ip_adapters,
    "svd": svd,
    "i2vgen_xl": i2vgen_xl,
    "kandinsky22": kandinsky22,
}


def build(name: str) -> PipelineSystem:
    return BUILDERS[name]()


if __name__ == "__main__":  # smoke run: python tests/pipeline_systems_unet.py [names...]
    import sys
    import time

    for key in sys.argv[1:] or BUILDERS:
        t0 = time.perf_counter()
        system = build(key)
        t1 = time.perf_counter()
        out = system.run(seed=0)
        t2 = time.perf_counter()
        again = system.run(seed=0)
        t3 = time.perf_counter()
        print(f"{key:22s} build {t1 - t0:5.2f}s run {t2 - t1:5.2f}s/{t3 - t2:5.2f}s out {tuple(out.shape)} "
              f"finite {bool(torch.isfinite(out).all())} deterministic {torch.equal(out, again)} "
              f"sites {len(system.sites)} mapped {len(system.mapped_sites())}", flush=True)
