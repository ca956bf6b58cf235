"""Reading attribution maps: aggregate, resize, normalise (docs/design.md, "What is computed", eq. 5-16).

The tracer leaves, per traced layer ``l``, float32 state at the layer's own resolution:

- ``generated[l]``  ``[G, I, H, Nq_l]``  sums over the steps of each time group of the
  generated map (softmax over queries, mean over keys);
- ``reference[l]``  ``[G, I, H, Nk_l]``  the same for the reference map (softmax over keys,
  mask-weighted mean over queries);
- ``probes[l]``     ``[G, I, H, P, Nk_l]`` the same for the key-softmax rows of the probed
  queries (specific-reference maps);
- ``share[l]``      ``[G, I, H, Nq_l]`` where the reference shares one softmax with other tokens:
  the fraction of each generated token's attention that lands on the reference,

with ``G`` time groups, ``I`` images and ``H`` heads (``Nq_l`` / ``Nk_l``: the layer's generated
queries and reference keys). Each layer belongs to one reference source; reference maps are read
per source (docs/design.md, "Reference tokens inside one softmax"). Reading a map picks a time group (or sums
all of them), picks a head (or averages them), resizes each layer's map to a common grid
(bicubic, clamped at 0, as the paper's authors do) and averages over layers; ``normalize=True``
then applies min-max normalisation. The maps file is written and read by :mod:`.files`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .files import read_maps_file, write_maps_file
from .resize import PIXEL_THRESHOLD, normalize_map, pixel_map, resize_map

__all__ = ["AttributionMaps", "LayerInfo", "DEFAULT_VAE_SCALE_FACTOR"]

# Pixels per latent cell when nothing says otherwise (Stable Diffusion's VAE; maps files
# written before the factor was recorded).
DEFAULT_VAE_SCALE_FACTOR = 8


@dataclass(frozen=True)
class LayerInfo:
    """One traced attention layer (one reference source of one attention module).

    ``generated_grid`` is the grid ``(h_l, w_l)`` of the layer's generated queries; the reference
    map covers the last ``reference_grid[0] * reference_grid[1]`` of the source's reference keys,
    the first ``reference_offset`` of them (a CLS token, text tokens) being off the grid.
    ``num_keys``: the attention call's key count. ``source``: the name of the reference source.
    ``token_list``: the reference keys are a plain list of tokens, no grid (``reference_grid`` is
    then ``(1, n)``, drawn as a strip). ``has_share``: the layer has a share map (its reference
    shares one softmax with other tokens).
    """

    name: str
    generated_grid: tuple[int, int]
    reference_grid: tuple[int, int]
    reference_offset: int
    heads: int
    num_keys: int
    source: str = "reference"
    token_list: bool = False
    has_share: bool = False


class AttributionMaps:
    """The I²AM maps of a traced run, at each layer's resolution, and how to read them.

    Obtain one from ``tracer.maps()`` or :meth:`load`. Every reader returns a float32 tensor on
    the device the state lives on:

    - :meth:`generated` ``[h, w]`` on the latent grid: where the generated image used the
      reference;
    - :meth:`reference` ``[h_I, w_I]`` on the finest grid of one reference source (``[1, n]``
      for a token-list source): which reference regions were used;
    - :meth:`specific_reference` ``[h_I, w_I]``: which reference regions one probed latent
      cell used;
    - :meth:`share` ``[h, w]`` on the latent grid, for layers whose reference shares one softmax
      with other tokens: the fraction of each generated token's attention on the reference;
    - :meth:`generated_pixels` / :meth:`reference_pixels`: the same at image size, with the
      paper's 0.4 threshold.

    With ``time_group=None`` the maps integrate over time, with ``head=None`` over heads;
    ``layer=name`` reads one layer at its own grid (no resize, no mean over layers);
    ``source=`` (a name from :meth:`sources`, or its position) reads the layers of one
    reference source. Reference maps of different sources are never averaged together.
    """

    def __init__(
        self,
        layers: Sequence[LayerInfo],
        generated: dict[str, torch.Tensor],
        reference: dict[str, torch.Tensor],
        probes: dict[str, torch.Tensor],
        *,
        latent_grid: tuple[int, int],
        time_groups: int,
        num_steps: int,
        probe_points: Sequence[tuple[int, int]] = (),
        cfg: str = "cond",
        image_entries: Sequence[str] = (),
        images: Optional[dict[str, torch.Tensor]] = None,
        vae_scale_factor: int = DEFAULT_VAE_SCALE_FACTOR,
        share: Optional[dict[str, torch.Tensor]] = None,
    ):
        self.layers = list(layers)
        self.latent_grid = (int(latent_grid[0]), int(latent_grid[1]))
        self.time_groups = int(time_groups)
        self.num_steps = int(num_steps)
        self.probe_points = [(int(r), int(c)) for r, c in probe_points]
        self.cfg = cfg
        self.image_entries = list(image_entries)
        # Pixels per latent cell of the traced model's image codec (the demo model's is 4).
        self.vae_scale_factor = int(vae_scale_factor)
        # Pictures of the run (generated image, inputs, masks) kept with the maps, if any.
        self.images = dict(images or {})
        self._generated = dict(generated)
        self._reference = dict(reference)
        self._probes = dict(probes)
        self._share = dict(share or {})
        if not self.layers:
            raise ValueError("AttributionMaps needs at least one traced layer.")
        for info in self.layers:
            g = self._generated[info.name]
            if g.dim() != 4 or g.shape[0] != self.time_groups or g.shape[2] != info.heads:
                raise ValueError(f"generated state of layer {info.name} has shape {list(g.shape)}, expected [G, I, H, Nq].")
            if info.has_share and info.name not in self._share:
                raise ValueError(f"layer {info.name} has a share map but no share state was given.")
        self.num_images = int(self._generated[self.layers[0].name].shape[1])
        # The finest reference grid of the first source (of every layer, for one source): the grid
        # its reference maps are read on.
        first = self._source_layers(self.sources()[0])
        self.reference_grid = max((info.reference_grid for info in first), key=lambda g: g[0] * g[1])

    # ------------------------------------------------------------------ sources
    def sources(self) -> list[str]:
        """The reference sources of the traced layers, in order of first appearance."""
        return list(dict.fromkeys(info.source for info in self.layers))

    def _source_name(self, source) -> str:
        names = self.sources()
        if isinstance(source, int) and not isinstance(source, bool):
            if not 0 <= source < len(names):
                raise ValueError(f"source {source} is out of range: this trace has sources {names} (0..{len(names) - 1}).")
            return names[source]
        if source not in names:
            raise ValueError(f"source {source!r} was not traced; the traced reference sources are {names}.")
        return source

    def _source_layers(self, source) -> list[LayerInfo]:
        name = self._source_name(source)
        return [info for info in self.layers if info.source == name]

    def _reference_layers(self, source, reader: str, names: Optional[list[str]] = None) -> list[LayerInfo]:
        """The layers a reference-side read averages: those of ``source``, or of the only source
        (among ``names``, default every source)."""
        if source is None:
            names = self.sources() if names is None else names
            if len(names) > 1:
                grids = {n: sorted({i.reference_grid for i in self._source_layers(n)}) for n in names}
                raise ValueError(
                    f"this trace has {len(names)} reference sources with grids {grids}; their reference maps are "
                    f"not averaged together: pass {reader}(source=name) with one of {names} (or its position)."
                )
            source = names[0]
        return self._source_layers(source)

    @staticmethod
    def _reference_target(infos: Sequence[LayerInfo]) -> tuple[int, int]:
        """The grid a source's layers are resized to: its finest grid, or its token strip."""
        lists = {info.token_list for info in infos}
        if lists == {True}:
            counts = {info.reference_grid for info in infos}
            if len(counts) > 1:
                raise ValueError(f"the token-list layers of source {infos[0].source!r} have different token counts "
                                 f"{sorted(c[1] for c in counts)}; read them one at a time with layer=name.")
        elif len(lists) > 1:
            raise ValueError(f"source {infos[0].source!r} mixes token-list layers and layers on a grid; read them one "
                             "at a time with layer=name.")
        return max((info.reference_grid for info in infos), key=lambda g: g[0] * g[1])

    # ------------------------------------------------------------------ reading
    def generated(self, time_group: Optional[int] = None, head: Optional[int] = None, image: int = 0,
                  normalize: bool = True, layer: Optional[str] = None, mode: str = "bicubic",
                  source=None) -> torch.Tensor:
        """Generated-image attribution map ``[h, w]`` (eq. 4-7; per group eq. 10, per head eq. 11),
        over every traced layer, or those of one reference ``source``."""
        infos = self.layers if source is None else self._source_layers(source)
        return self._read("generated", time_group, head, image, normalize, layer, mode, infos)

    def reference(self, time_group: Optional[int] = None, head: Optional[int] = None, image: int = 0,
                  normalize: bool = True, layer: Optional[str] = None, mode: str = "bicubic",
                  source=None) -> torch.Tensor:
        """Reference-image attribution map ``[h_I, w_I]`` of one reference source (eq. 12-15,
        weighted by eq. 17 when an inpainting mask was traced). ``source`` may be left out when
        the trace has one source; a token-list source reads as a strip ``[1, n]``."""
        infos = None if layer is not None else self._reference_layers(source, "reference")
        return self._read("reference", time_group, head, image, normalize, layer, mode, infos)

    def share(self, time_group: Optional[int] = None, head: Optional[int] = None, image: int = 0,
              normalize: bool = True, layer: Optional[str] = None, mode: str = "bicubic",
              source=None) -> torch.Tensor:
        """Reference-share map ``[h, w]`` on the latent grid: per generated token, the fraction of
        its attention (softmax over every key of the call) that lands on the reference keys;
        over the layers that have one (reference tokens inside one softmax)."""
        if layer is not None:
            if not self._layer(layer).has_share:
                raise ValueError(f"layer {layer!r} has no share map: its reference keys have a softmax of their own.")
            infos = None
        else:
            with_share = list(dict.fromkeys(info.source for info in self.layers if info.has_share))
            infos = [] if not with_share else [
                info for info in self._reference_layers(source, "share", with_share) if info.has_share]
            if with_share and not infos:
                raise ValueError(f"source {source!r} has no share map (its keys have a softmax of their own); "
                                 f"sources with share maps: {with_share}.")
            if not infos:
                raise ValueError(
                    "no traced layer has a share map: share maps exist where the reference shares one softmax with "
                    "other tokens (a self-attention or joint-attention layout; trace(..., layout=...))."
                )
        return self._read("share", time_group, head, image, normalize, layer, mode, infos)

    def specific_reference(self, point: Sequence[int], time_group: Optional[int] = None, head: Optional[int] = None,
                           image: int = 0, normalize: bool = True, layer: Optional[str] = None,
                           mode: str = "bicubic", source=None) -> torch.Tensor:
        """Specific-reference map ``[h_I, w_I]`` of a probed latent cell ``point = (row, col)`` (eq. 16)."""
        point = (int(point[0]), int(point[1]))
        if point not in self.probe_points:
            raise ValueError(
                f"point {point} was not probed; traced probes are {self.probe_points}. "
                "Pass it in trace(..., probes=[(row, col), ...]) before the run."
            )
        infos = None if layer is not None else self._reference_layers(source, "specific_reference")
        return self._read("probes", time_group, head, image, normalize, layer, mode, infos,
                          probe=self.probe_points.index(point))

    def generated_pixels(self, size: Sequence[int], threshold: float = PIXEL_THRESHOLD, **selection) -> torch.Tensor:
        """The normalised generated map at image size ``(H, W)``, thresholded (eq. 8-9).
        ``selection``: time_group, head, image, layer, source, as for :meth:`generated`."""
        return pixel_map(self.generated(normalize=True, **selection), size, threshold)

    def reference_pixels(self, size: Sequence[int], threshold: float = PIXEL_THRESHOLD, **selection) -> torch.Tensor:
        """The normalised reference map at reference-image size ``(H, W)``, thresholded."""
        return pixel_map(self.reference(normalize=True, **selection), size, threshold)

    def layer_names(self) -> list[str]:
        return [info.name for info in self.layers]

    def _read(self, kind, time_group, head, image, normalize, layer, mode, infos, probe=None):
        infos = [self._layer(layer)] if layer is not None else infos
        self._check_selection(time_group, head, image, infos)
        states = {"generated": self._generated, "reference": self._reference, "probes": self._probes,
                  "share": self._share}[kind]
        on_queries = kind in ("generated", "share")
        target = self.latent_grid if on_queries else self._reference_target(infos)
        per_layer = []
        for info in infos:
            state = states[info.name]
            x = state.sum(0) if time_group is None else state[time_group]  # [I, H, ...]
            x = x[image]  # [H, N] or [H, P, N]
            if probe is not None:
                x = x[:, probe]
            x = x if head is None else x[head : head + 1]  # [heads, N]
            if on_queries:
                x = x.reshape(-1, *info.generated_grid)
            else:
                x = x[:, info.reference_offset :].reshape(-1, *info.reference_grid)
            # Eq. 6 / 14: each (layer, head) map is resized (and clamped) before the means.
            per_layer.append((x if layer is not None else resize_map(x, target, mode)).mean(0))
        m = torch.stack(per_layer).mean(0) if layer is None else per_layer[0]
        return normalize_map(m) if normalize else m

    def _layer(self, name: str) -> LayerInfo:
        for info in self.layers:
            if info.name == name:
                return info
        raise ValueError(f"layer {name!r} was not traced; traced layers are {self.layer_names()}.")

    def _check_selection(self, time_group, head, image, infos):
        if time_group is not None and not 0 <= time_group < self.time_groups:
            raise ValueError(f"time_group {time_group} is out of range: this trace has {self.time_groups} time groups "
                             f"(0..{self.time_groups - 1}); pass None to integrate over time.")
        if head is not None:
            heads = min(info.heads for info in infos)  # the read layers' heads (layers may differ)
            if not 0 <= head < heads:
                raise ValueError(f"head {head} is out of range: the layers read have {heads} heads (0..{heads - 1}); "
                                 "pass None to integrate over heads.")
        if not 0 <= image < self.num_images:
            raise ValueError(f"image {image} is out of range: this trace holds maps for {self.num_images} image(s) "
                             f"(0..{self.num_images - 1}).")

    # ------------------------------------------------------------------ files
    def with_images(self, images: dict[str, torch.Tensor]) -> "AttributionMaps":
        """The same maps (sharing their state, not copying it) with ``images`` as :attr:`images`."""
        return AttributionMaps(self.layers, self._generated, self._reference, self._probes, images=images,
                               share=self._share, **self._settings())

    def _settings(self) -> dict:
        return {"latent_grid": list(self.latent_grid), "time_groups": self.time_groups, "num_steps": self.num_steps,
                "probe_points": [list(p) for p in self.probe_points], "cfg": self.cfg,
                "image_entries": self.image_entries, "vae_scale_factor": self.vae_scale_factor}

    def save(self, path: str) -> None:
        """Writes the state (and :attr:`images`) as safetensors, with the layer table and settings
        as JSON metadata."""
        state = {"generated": self._generated, "reference": self._reference, "probes": self._probes,
                 "share": self._share}
        write_maps_file(path, self.layers, state, self.images, self._settings())

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> "AttributionMaps":
        """Reads maps written by :meth:`save`."""
        layer_dicts, state, images, meta = read_maps_file(path, device)
        layers = [LayerInfo(d["name"], tuple(d["generated_grid"]), tuple(d["reference_grid"]),
                            d["reference_offset"], d["heads"], d["num_keys"], source=d.get("source", "reference"),
                            token_list=bool(d.get("token_list", False)), has_share=bool(d.get("has_share", False)))
                  for d in layer_dicts]
        return cls(layers, state["generated"], state["reference"], state["probes"], share=state.get("share", {}),
                   latent_grid=tuple(meta["latent_grid"]), time_groups=meta["time_groups"],
                   num_steps=meta["num_steps"], probe_points=[tuple(p) for p in meta["probe_points"]],
                   cfg=meta["cfg"], image_entries=meta.get("image_entries", []), images=images,
                   vae_scale_factor=meta.get("vae_scale_factor", DEFAULT_VAE_SCALE_FACTOR))

    def __repr__(self) -> str:
        return (f"AttributionMaps({len(self.layers)} layers, latent grid {self.latent_grid}, reference grid "
                f"{self.reference_grid}, {self.time_groups} time groups over {self.num_steps} steps, "
                f"{self.num_images} image(s), probes {self.probe_points}, sources {self.sources()})")
