"""What the MMDiT adapters (Flux and FLUX.1 Kontext, SD3, Qwen-Image) share.

MMDiT transformers run joint attention: text and image tokens (and, for the editing models,
reference-image tokens) are concatenated into one sequence and attend in one softmax. Their
attention modules are not ``Attention`` modules with ``is_cross_attention``, and RoPE, the
qk-norms and the concatenation happen inside the processor, so each adapter swaps in its own
processor class that computes what the stock processor computes and hands the kernel call to
the traced layer with the call's token layout (docs/design.md, "Reference tokens inside one
softmax" and "Supported systems").

Shared here:

- :class:`Span` / :class:`Source` / :class:`CallLayout`: an adapter-side description of one
  kernel call (contiguous token ranges, which is what every family here produces), turned into
  the core's :class:`~i2am_fast.adapters.base.TokenLayout` by :func:`token_layout`;
- :class:`MMDiTAdapter`: target resolution (pipeline or bare transformer), the schedule, the
  timestep on the schedule's scale (Flux and Qwen call the transformer with ``t / 1000``),
  the site search by processor class, the processor swap, and the facts of the call in
  progress, which the processors read (single-stream blocks cannot see the text length);
- :func:`attend_bnhd`: a traced kernel call on ``[B, N, H, D]`` tensors (the layout diffusers'
  ``dispatch_attention_fn`` takes).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from .base import AttentionSink, Guidance, KeyTokens, ModelAdapter, ModelCall, QueryTokens, Site, TokenLayout

__all__ = ["CallLayout", "MMDiTAdapter", "Source", "Span", "StockProcessor", "attend_bnhd", "class_names", "token_layout"]

Grid = tuple[int, int]


# ---------------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Span:
    """Tokens ``[start, start + length)`` of one kernel call's sequence axis."""

    start: int
    length: int

    @property
    def stop(self) -> int:
        return self.start + self.length

    def index(self, device=None) -> torch.Tensor:
        return torch.arange(self.start, self.stop, dtype=torch.long, device=device)


@dataclass(frozen=True)
class Source:
    """One reference source among a kernel call's keys: its span, and its grid (None: a token list)."""

    name: str
    span: Span
    grid: Optional[Grid]


@dataclass(frozen=True)
class CallLayout:
    """One kernel call: ``num_queries`` x ``num_keys`` tokens; the generated queries (span and
    grid), the reference sources, the key padding mask (bool ``[B, num_keys]``, True = the key
    takes part) and whether the reference shares its softmax with other keys."""

    num_queries: int
    num_keys: int
    generated: Span
    generated_grid: Grid
    sources: tuple[Source, ...]
    key_padding_mask: Optional[torch.Tensor] = None
    shared_softmax: bool = False


def token_layout(layout: CallLayout, device=None) -> TokenLayout:
    """The core's :class:`TokenLayout` of one kernel call (its first reference source; an
    adapter that feeds several sources makes one kernel-call layout per source)."""
    (source,) = layout.sources[:1] or (None,)
    if source is None:
        raise ValueError("a traced MMDiT kernel call has no reference tokens (an adapter bug).")
    whole_queries = layout.generated.start == 0 and layout.generated.length == layout.num_queries
    whole_keys = source.span.start == 0 and source.span.length == layout.num_keys
    queries = QueryTokens(None if whole_queries else layout.generated.index(device), layout.generated_grid)
    keys = KeyTokens(source.name, None if whole_keys else source.span.index(device), source.grid,
                     token_list=source.grid is None)
    return TokenLayout(queries, keys, layout.key_padding_mask, layout.shared_softmax)


def attend_bnhd(sink: AttentionSink, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                layout: CallLayout, cache: Optional[dict] = None) -> torch.Tensor:
    """A traced kernel call on ``[B, N, H, D]`` tensors; returns ``[B, Nq, H, Dv]`` (a view).

    ``cache`` keeps one :class:`TokenLayout` per layer and layout: the core compares a layer's
    layout with its first call's, and the same object needs no comparison."""
    if query.shape[1] != layout.num_queries or key.shape[1] != layout.num_keys:
        raise ValueError(
            f"layer {sink.name}: the attention call has {query.shape[1]} queries and {key.shape[1]} keys but its "
            f"model call says {layout.num_queries} and {layout.num_keys}; the transformer was called in a way its "
            "adapter does not know (exclude the layer with layers=)."
        )
    if cache is None:
        handed = token_layout(layout, query.device)
    else:
        key_of = (sink.name, layout.num_queries, layout.num_keys, layout.generated, layout.generated_grid,
                  layout.sources, layout.shared_softmax, query.device)
        if key_of not in cache:
            cache[key_of] = token_layout(dataclasses.replace(layout, key_padding_mask=None), query.device)
        handed = cache[key_of]
        if layout.key_padding_mask is not None:
            handed = dataclasses.replace(handed, key_padding_mask=layout.key_padding_mask)
    out = sink.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=None, layout=handed)
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------- processors
class StockProcessor:
    """Base of the traced processors. Each is instantiated as a subclass of the stock processor
    it replaces (:meth:`replacing`), because pipelines and loaders find processors by class
    (``is_ip_adapter_active``, ``set_ip_adapter_scale``: without it SD3's pipeline silently
    drops the IP-Adapter). The stock ``__init__`` is not run: a processor holding weights
    shares the replaced one's submodules instead (:meth:`adopt`), so they stay in the module tree."""

    _subclasses: dict = {}

    @classmethod
    def replacing(cls, original, *args):
        stock = type(original)
        key = (cls, stock)
        if key not in StockProcessor._subclasses:
            StockProcessor._subclasses[key] = type(cls.__name__, (cls, stock), {"__module__": cls.__module__})
        processor = StockProcessor._subclasses[key].__new__(StockProcessor._subclasses[key])
        processor.adopt(original)
        processor.__init__(*args)
        return processor

    def adopt(self, original) -> None:
        if isinstance(self, torch.nn.Module):
            torch.nn.Module.__init__(self)
            for name, child in original.named_children():
                self.add_module(name, child)
        object.__setattr__(self, "original", original)


# ---------------------------------------------------------------------------------------- adapter
def class_names(obj) -> set[str]:
    """The names of ``obj``'s class and its bases (family checks without importing diffusers)."""
    return {c.__name__ for c in type(obj).__mro__}


def _first_float(value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.flatten()[0].item())
    return float(value)


@dataclass
class CallFacts:
    """What one transformer call tells the processors (set by ``decode_call``)."""

    batch: int
    text_len: int
    target: Span  # the generated tokens within the IMAGE stream
    target_grid: Grid
    image_len: int
    references: tuple[Source, ...] = ()  # spans within the image stream (Kontext, Qwen)
    text_sources: tuple[Source, ...] = ()  # spans within the text stream (Redux)
    text_mask: Optional[torch.Tensor] = None  # bool [B, text_len]
    extra: dict = field(default_factory=dict)


class MMDiTAdapter(ModelAdapter):
    """Common part of the MMDiT adapters. A subclass sets ``family``, ``transformer_classes``
    (class names its root may have), ``timestep_scale`` (transformer timestep = schedule
    timestep x this) and ``token_factor(pipe, transformer)`` (pixels per token side), and
    implements ``sites``, ``make_processor`` and ``read_call``."""

    transformer_classes: tuple[str, ...] = ()
    timestep_scale: float = 1.0
    default_token_factor: int = 16

    def __init__(self, target, options):
        super().__init__()
        layout = getattr(options, "layout", "cross")
        if layout != "cross":
            raise ValueError(
                f"layout={layout!r} describes UNet self-attention; {type(self).__name__} reads every joint-attention "
                "layout from the model's own calls. Leave layout at its default.")
        self.options = options
        transformer = getattr(target, "transformer", None)
        self.pipe = target if isinstance(transformer, torch.nn.Module) else None
        self.root = transformer if self.pipe is not None else target
        self.scheduler = getattr(self.pipe, "scheduler", None)
        self.vae_scale_factor = self.token_factor(self.pipe, self.root)
        self.current: Optional[CallFacts] = None
        self.layouts: dict = {}  # TokenLayout objects handed to the core, see attend_bnhd
        self._prompt_encodings: Optional[int] = None  # encode_prompt calls of the pipeline run in progress
        self._called_since_encoding = False

    @classmethod
    def accepts(cls, target) -> bool:
        transformer = getattr(target, "transformer", target)
        return isinstance(transformer, torch.nn.Module) and bool(class_names(transformer) & set(cls.transformer_classes))

    def token_factor(self, pipe, transformer) -> int:
        if pipe is None or getattr(pipe, "vae_scale_factor", None) is None:
            return self.default_token_factor
        return 2 * int(pipe.vae_scale_factor)

    # ------------------------------------------------------------- schedule
    def timesteps(self):
        return None if self.scheduler is None else getattr(self.scheduler, "timesteps", None)

    @property
    def has_schedule(self) -> bool:
        return self.scheduler is not None

    def schedule_timestep(self, timestep) -> Optional[float]:
        """The transformer's timestep on the schedule's scale: the schedule's own value when one
        lies within float32 rounding of ``timestep / timestep_scale`` (the division by 1000
        rounds), else the plain quotient."""
        t = _first_float(timestep)
        if t is None or self.timestep_scale == 1.0:
            return t
        schedule = self.timesteps()
        if schedule is not None and len(schedule) > 0:
            scaled = torch.as_tensor(schedule).flatten().double()
            gaps = (scaled * self.timestep_scale - t).abs()
            nearest = int(gaps.argmin())
            if float(gaps[nearest]) <= 1e-6 * max(1.0, abs(t)) + 1e-7:
                return float(torch.as_tensor(schedule).flatten()[nearest].item())
        return t / self.timestep_scale

    # ------------------------------------------------------------- sites
    def attention_modules(self, processor_classes: Sequence[str]) -> list[tuple[str, Any]]:
        """``(name, module)`` of the root's attention modules whose processor is one of
        ``processor_classes`` and that the ``layers`` option keeps, outside any image-encoder
        projection (``image_proj``, ``encoder_hid_proj``)."""
        chosen = []
        for name, module in self.root.named_modules():
            processor = getattr(module, "processor", None)
            if processor is None or not (class_names(processor) & set(processor_classes)):
                continue
            if name.split(".")[0] in ("image_proj", "encoder_hid_proj"):
                continue
            if self.options.keeps(name, module):
                chosen.append((name, module))
        return chosen

    def no_sites(self, what: str) -> ValueError:
        selector = self.options.layers
        return ValueError(
            f"no attention layers to trace in {type(self.root).__name__}"
            + ("" if selector is None else f" matching layers={selector!r}") + f": {what}"
        )

    # ------------------------------------------------------------- interception
    def make_processor(self, site: Site, sinks: Sequence[AttentionSink]):
        raise NotImplementedError

    def watch_prompts(self) -> None:
        """Counts the pipeline's ``encode_prompt`` calls per run: Flux and Qwen-Image pipelines
        encode the negative prompt only when they will run true CFG (two calls per step)."""
        encode = getattr(self.pipe, "encode_prompt", None)
        if self._prompt_encodings is not None or not callable(encode):
            return
        self._prompt_encodings = 0

        def encode_prompt(*args, **kwargs):
            if self._called_since_encoding:  # a new run of the pipeline
                self._prompt_encodings, self._called_since_encoding = 0, False
            self._prompt_encodings += 1
            return encode(*args, **kwargs)

        self.replace_attribute(self.pipe, "encode_prompt", encode_prompt)
        self.remember(lambda: setattr(self, "_prompt_encodings", None))

    def install(self, site: Site, sinks: Sequence[AttentionSink]) -> None:
        self.watch_prompts()
        module, original = site.module, site.module.processor
        processor = self.make_processor(site, sinks)
        for attr in ("_attention_backend", "_parallel_config"):
            if hasattr(original, attr):
                setattr(processor, attr, getattr(original, attr))
        self.remember(lambda: module.set_processor(original))
        module.set_processor(processor)

    def facts(self, layer: str) -> CallFacts:
        if self.current is None:
            raise RuntimeError(f"layer {layer} ran outside a forward call of the traced {type(self.root).__name__}.")
        return self.current

    # ------------------------------------------------------------- calls
    def read_call(self, kwargs: dict) -> CallFacts:
        raise NotImplementedError

    def guidance(self, kwargs: dict, facts: CallFacts) -> Guidance:
        """Flux and Qwen true CFG: separate calls, in ``guidance_order``, when the pipeline run
        encoded a negative prompt; no halves when it encoded one prompt. A bare transformer
        (or calls outside a pipeline run) reads as separate: its first call of a step maps as
        the conditional half."""
        if self._prompt_encodings == 1:
            return Guidance.none()
        return Guidance.separate(self.guidance_order)

    def decode_call(self, args: tuple, kwargs: dict) -> ModelCall:
        if args and "hidden_states" not in kwargs:
            kwargs = dict(kwargs, hidden_states=args[0])
        hidden = kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor):
            raise ValueError(f"the traced {type(self.root).__name__} was called without a hidden_states tensor.")
        facts = self.read_call(kwargs)
        self.current = facts
        self._called_since_encoding = True
        return ModelCall(facts.batch, self.schedule_timestep(kwargs.get("timestep")), facts.target_grid,
                         self.guidance(kwargs, facts), describe=f"hidden_states of shape {list(hidden.shape)}")


def square_side(count: int) -> Optional[int]:
    side = math.isqrt(count) if count > 0 else 0
    return side if side > 0 and side * side == count else None
