"""Writes the pictures, scores and HTML report of a traced run into a folder.

Used by ``i2am-fast demo``, ``run`` and ``show``. Given :class:`~i2am_fast.AttributionMaps`
(and, where known, the images of the run), it writes:

- ``generated.png``: the generated image (and the inputs it was made from);
- ``generated_map.png`` / ``generated_overlay.png``, ``reference_map.png`` /
  ``reference_overlay.png``: time-and-head integrated maps, raw heat map and overlay;
- ``generated_time_groups.png`` / ``reference_time_groups.png``: head-integrated maps per
  time group; ``generated_heads.png`` / ``reference_heads.png``: time-integrated maps per
  head (the layouts of the paper's figures 5-8);
- ``specific_reference.png``: for each probed latent cell, the cell boxed in red on the
  generated image beside its specific-reference map;
- where the reference shares one softmax with other tokens: ``share_map.png`` /
  ``share_overlay.png``, the fraction of each generated token's attention on the reference;
- with several reference sources, the first source's maps under the names above and each
  other source's as ``reference_map.<source>.png`` (and ``share_map.<source>.png``); a source
  that is a token list (no grid) is drawn as a strip, never as a square;
- ``maps.safetensors`` (maps plus the images), ``imacs.json``, ``report.html`` (one page,
  images embedded, no server needed).
"""

from __future__ import annotations

import base64
import html
import json
import os
from typing import Optional

from PIL import Image

from .imacs import imacs
from .maps import AttributionMaps
from .pictures import contact_sheet, draw_box, heatmap, overlay, to_pil

__all__ = ["write_outputs", "IMAGE_KEYS"]

# Images a run may attach to its maps (each [3, H, W] or [H, W] in [0, 1]).
IMAGE_KEYS = ("generated", "person", "inpaint_mask", "garment", "garment_mask")
TILE_WIDTH = 192


def _scaled(img: Image.Image, width: int = TILE_WIDTH) -> Image.Image:
    if img.width == width:
        return img
    return img.resize((width, max(1, round(img.height * width / img.width))), Image.BICUBIC)


def _map_tiles(read, count: int, base: Optional[Image.Image], size, labels) -> list:
    tiles = []
    for i in range(count):
        m = read(i)
        tiles.append(_scaled(overlay(base, m, alpha=0.55) if base is not None else heatmap(m, size, mode="bicubic")))
    return tiles


def write_outputs(maps: AttributionMaps, out_dir: str, images: Optional[dict] = None, *, title: str = "I²AM attribution maps",
                  notes: Optional[list] = None, lam: float = 3.0, threshold: float = 0.4,
                  progress=None) -> dict:
    """Writes every output into ``out_dir`` (which must exist) and returns ``{name: path}``.

    ``images`` (optional) holds any of :data:`IMAGE_KEYS`; with ``inpaint_mask`` the IMACS_g
    score is computed, with ``garment_mask`` too IMACS_r. The images are saved inside
    ``maps.safetensors`` as well, so ``i2am-fast show`` can redraw everything.
    """
    images = {k: v.detach().float().cpu() for k, v in (images or maps.images).items() if v is not None}
    unknown = set(images) - set(IMAGE_KEYS)
    if unknown:
        raise ValueError(f"unknown image names {sorted(unknown)}; expected some of {IMAGE_KEYS}.")
    written = {}

    def save(name: str, img: Image.Image) -> None:
        path = os.path.join(out_dir, name)
        img.save(path)
        written[name] = path

    steps = ["images", "maps", "time groups", "heads", "probes", "scores", "report"]
    tick = (lambda i: progress(i, len(steps))) if progress else (lambda i: None)

    pil = {k: to_pil(v) for k, v in images.items()}
    for key in IMAGE_KEYS:
        if key in pil:
            save(f"{key}.png", pil[key])
    tick(1)

    sources = maps.sources()
    main = sources[0]
    strip = all(info.token_list for info in maps.layers if info.source == main)
    generated_base = pil.get("generated")
    reference_base = None if strip else pil.get("garment")  # a token list has no picture to overlay
    # Without the pictures: the generated map at the model's image size; the reference map
    # drawn at the same number of pixels per token (only a display size).
    factor = maps.vae_scale_factor
    gen_size = (generated_base.height, generated_base.width) if generated_base else tuple(factor * v for v in maps.latent_grid)
    ref_size = (reference_base.height, reference_base.width) if reference_base else tuple(factor * v for v in maps.reference_grid)
    g_all, r_all = maps.generated(), maps.reference(source=main)
    save("generated_map.png", heatmap(g_all, gen_size, mode="nearest"))
    save("reference_map.png", heatmap(r_all, ref_size, mode="nearest"))
    if generated_base is not None:
        save("generated_overlay.png", overlay(generated_base, g_all, alpha=0.5, threshold=threshold))
    if reference_base is not None:
        save("reference_overlay.png", overlay(reference_base, r_all, alpha=0.5, threshold=threshold))
    _write_sources(maps, sources, save, gen_size, generated_base, threshold)
    tick(2)

    groups = range(maps.time_groups)
    group_labels = [f"t{tau} (steps {tau * maps.num_steps // maps.time_groups}-{(tau + 1) * maps.num_steps // maps.time_groups - 1})" for tau in groups]
    read_reference = lambda **selection: maps.reference(source=main, **selection)  # noqa: E731
    for kind, base, size, read in (("generated", generated_base, gen_size, maps.generated),
                                    ("reference", reference_base, ref_size, read_reference)):
        tiles = _map_tiles(lambda tau: read(time_group=tau), maps.time_groups, base, size, group_labels)
        save(f"{kind}_time_groups.png", contact_sheet(tiles, group_labels, title=f"{kind} map, head-integrated, per time group"))
    tick(3)

    heads = min(info.heads for info in maps.layers)
    head_labels = [f"head {n}" for n in range(heads)]
    for kind, base, size, read in (("generated", generated_base, gen_size, maps.generated),
                                    ("reference", reference_base, ref_size, read_reference)):
        tiles = _map_tiles(lambda n: read(head=n), heads, base, size, head_labels)
        save(f"{kind}_heads.png", contact_sheet(tiles, head_labels, columns=min(heads, 8),
                                                title=f"{kind} map, time-integrated, per head"))
    tick(4)

    if maps.probe_points:
        tiles, labels = [], []
        h, w = maps.latent_grid
        for point in maps.probe_points:
            r, c = point
            left = generated_base if generated_base is not None else heatmap(g_all, gen_size)
            sy, sx = left.height / h, left.width / w
            tiles.append(_scaled(draw_box(left, (c * sx, r * sy, (c + 1) * sx - 1, (r + 1) * sy - 1), width=2)))
            labels.append(f"cell {point}")
            m = maps.specific_reference(point, source=main)
            tiles.append(_scaled(overlay(reference_base, m, alpha=0.55) if reference_base is not None else heatmap(m, ref_size, mode="bicubic")))
            labels.append("its reference map")
        save("specific_reference.png", contact_sheet(tiles, labels, columns=2, title="specific-reference maps"))
    tick(5)

    scores = None
    if "inpaint_mask" in images:
        scores = _scores(g_all, r_all, images, lam, threshold)
        path = os.path.join(out_dir, "imacs.json")
        with open(path, "w") as f:
            json.dump(scores, f, indent=2)
        written["imacs.json"] = path
    maps_path = os.path.join(out_dir, "maps.safetensors")
    maps.with_images(images).save(maps_path)  # the caller's maps stay as they are
    written["maps.safetensors"] = maps_path
    tick(6)

    report_path = os.path.join(out_dir, "report.html")
    with open(report_path, "w") as f:
        f.write(_report_html(maps, written, scores, title, notes or []))
    written["report.html"] = report_path
    tick(7)
    return written


def _scores(g_all, r_all, images: dict, lam: float, threshold: float) -> dict:
    """IMACS as :func:`~i2am_fast.readout.imacs.imacs` returns it; a score whose mask is empty
    or full is None, with the reason under ``"undefined"`` (the maps are written all the same)."""
    scores = {"imacs_g": None, "imacs_r": None, "parts": {}, "lambda": lam, "threshold": threshold, "undefined": {}}
    pairs = {"g": (g_all, images["inpaint_mask"], "inpaint_mask")}
    if "garment_mask" in images:
        pairs["r"] = (r_all, images["garment_mask"], "garment_mask")
    for key, (attribution, mask, name) in pairs.items():
        try:
            one = imacs(attribution, mask, lam=lam, threshold=threshold)
        except ValueError as e:
            scores["undefined"][key] = str(e).replace("inpaint_mask", name)
            continue
        scores[f"imacs_{key}"] = one["imacs_g"]
        scores["parts"][key] = one["parts"]["g"]
    if not scores["undefined"]:
        del scores["undefined"]
    return scores


def _write_sources(maps: AttributionMaps, sources: list, save, gen_size, generated_base, threshold) -> None:
    """The share maps (where layers have one) and the reference maps of every source after the first."""
    factor = maps.vae_scale_factor
    for j, source in enumerate(sources):
        suffix = "" if j == 0 else f".{_file_part(source)}"
        infos = [info for info in maps.layers if info.source == source]
        if any(info.has_share for info in infos):
            m = maps.share(source=source)
            save(f"share_map{suffix}.png", heatmap(m, gen_size, mode="nearest"))
            if generated_base is not None and j == 0:
                save("share_overlay.png", overlay(generated_base, m, alpha=0.5, threshold=threshold))
        if j > 0:
            r = maps.reference(source=source)
            save(f"reference_map{suffix}.png", heatmap(r, tuple(factor * v for v in r.shape), mode="nearest"))


def _file_part(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(name))


def _data_uri(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


_CAPTIONS = [
    ("inputs", ["person.png", "inpaint_mask.png", "garment.png", "garment_mask.png", "generated.png"],
     "The inputs (person, region to fill, reference garment, garment mask) and the generated image."),
    ("Where the generated image used the reference", ["generated_map.png", "generated_overlay.png"],
     "Generated-image map, integrated over time and heads (eq. 4-7): raw heat map on the latent grid, and "
     "overlaid on the generated image after the 0.4 threshold (eq. 8-9)."),
    ("Which reference regions it used", ["reference_map.png", "reference_overlay.png"],
     "Reference-image map (eq. 12-15), weighted by the inpainting mask when one was traced (eq. 17)."),
    ("Over time", ["generated_time_groups.png", "reference_time_groups.png"],
     "Head-integrated maps per time group (eq. 10), from the first (noisiest) steps to the last."),
    ("Over heads", ["generated_heads.png", "reference_heads.png"],
     "Time-integrated maps per attention head (eq. 11)."),
    ("Share of attention on the reference", ["share_map.png", "share_overlay.png"],
     "Reference-share map: for each generated token, the part of its attention (one softmax over every key, "
     "reference, text and the image itself) that lands on the reference tokens."),
    ("Specific-reference maps", ["specific_reference.png"],
     "For each probed latent cell (red box), the reference regions that cell attended to (eq. 16)."),
]


def _report_html(maps: AttributionMaps, written: dict, scores: Optional[dict], title: str, notes: list) -> str:
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "img{max-width:100%;margin:4px;border:1px solid #ddd;vertical-align:top}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "p.caption{color:#555}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(repr(maps))}</p>",
    ]
    for note in notes:
        parts.append(f"<p>{html.escape(note)}</p>")
    if scores is not None:
        parts.append("<h2>IMACS (eq. 18)</h2><table><tr><th></th><th>score</th><th>mean inside</th><th>mean outside</th></tr>")
        for key, label in (("g", "IMACS_g (generated map vs inpainting mask)"), ("r", "IMACS_r (reference map vs garment mask)")):
            score = scores.get(f"imacs_{key}")
            reason = scores.get("undefined", {}).get(key)
            if reason is not None:
                parts.append(f"<tr><td style='text-align:left'>{label}</td><td colspan='3' style='text-align:left'>"
                             f"undefined: {html.escape(reason)}</td></tr>")
            if score is None:
                continue
            part = scores["parts"][key]
            parts.append(f"<tr><td style='text-align:left'>{label}</td><td>{score:.3f}</td>"
                         f"<td>{part['inside']:.3f}</td><td>{part['outside']:.3f}</td></tr>")
        parts.append(f"</table><p class='caption'>λ = {scores['lambda']}, threshold = {scores['threshold']}; "
                     "range [−λ, 1], higher means the attribution stays inside the masks.</p>")
    others = sorted(n for n in written if n.startswith(("reference_map.", "share_map.")) and n.count(".") > 1)
    captions = _CAPTIONS + [("Other reference sources", others, "Reference and share maps of each further reference "
                             "source (named after the dot); a token-list source is drawn as a strip.")]
    for heading, names, caption in captions:
        present = [n for n in names if n in written]
        if not present:
            continue
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for name in present:
            parts.append(f"<img alt='{html.escape(name)}' title='{html.escape(name)}' src='{_data_uri(written[name])}'>")
        parts.append(f"<p class='caption'>{html.escape(caption)}</p>")
    parts.append("<h2>Traced layers</h2><table><tr><th>layer</th><th>source</th><th>query grid</th><th>reference grid</th>"
                 "<th>share</th><th>heads</th><th>keys</th></tr>")
    for info in maps.layers:
        grid = f"{info.reference_grid[1]} tokens" if info.token_list else f"{info.reference_grid[0]}×{info.reference_grid[1]}"
        parts.append(f"<tr><td style='text-align:left'>{html.escape(info.name)}</td><td>{html.escape(info.source)}</td>"
                     f"<td>{info.generated_grid[0]}×{info.generated_grid[1]}</td><td>{grid}</td>"
                     f"<td>{'yes' if info.has_share else ''}</td><td>{info.heads}</td><td>{info.num_keys}</td></tr>")
    parts.append("</table></body></html>\n")
    return "\n".join(parts)
