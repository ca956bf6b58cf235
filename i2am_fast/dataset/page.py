"""``summary.html``: one self-contained page per dataset run (every picture inlined as a data URI).

It shows the run's settings, the per-category statistics, both histograms, the pairs with the
highest and lowest IMACS_g and IMACS_r (the person with the region to fill tinted, the garment
with its reference-map overlay, the generated image with its generated-map overlay, both after
the 0.4 threshold), and the error rows.
"""

from __future__ import annotations

import base64
import html
import io
import os
from typing import Sequence

__all__ = ["write_page", "pair_picture", "EXTREMES"]

EXTREMES = 3  # best and worst pairs shown per score
TILE_HEIGHT = 180


def _uri(img) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _file_uri(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def pair_picture(out: str, row: dict):
    """Person, garment with the reference-map overlay, generated image with the generated-map
    overlay, side by side, for one scored row."""
    from PIL import Image

    from ..readout.pictures import contact_sheet, overlay
    from .storage import COMPACT_NAME, IMAGE_NAME, read_compact

    folder = os.path.dirname(os.path.join(out, row["files"][0]))
    maps = read_compact(os.path.join(folder, COMPACT_NAME))
    with Image.open(os.path.join(folder, IMAGE_NAME)) as img:
        generated = img.convert("RGB")
    size = (generated.width, generated.height)
    scale = TILE_HEIGHT / generated.height
    tile = (max(1, round(generated.width * scale)), TILE_HEIGHT)

    def load(path):
        try:
            with Image.open(path) as img:
                return img.convert("RGB").resize(size, Image.BICUBIC)
        except OSError:
            return Image.new("RGB", size, (200, 200, 200))

    person, garment = load(row.get("person_path", "")), load(row.get("garment_path", ""))
    region = Image.fromarray((maps["inpaint_mask"].numpy() * 255).astype("uint8"), "L").resize(size, Image.NEAREST)
    to_fill = Image.composite(Image.blend(person, Image.new("RGB", size, (255, 0, 255)), 0.5), person, region)
    tiles = [to_fill, overlay(garment, maps["reference"], alpha=0.5, threshold=0.4),
             overlay(generated, maps["generated"], alpha=0.5, threshold=0.4)]
    labels = ["region to fill", f"ref. map r={row['imacs_r']:.2f}", f"gen. map g={row['imacs_g']:.2f}"]
    return contact_sheet([t.resize(tile, Image.BICUBIC) for t in tiles], labels, tile_size=tile,
                         title=f"{row['pair_id']} ({row['category']})")


def _fmt(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def write_page(out: str, rows: Sequence[dict], table: dict, files: dict, meta: dict, missing: Sequence[str]) -> str:
    """Writes ``OUT/summary.html`` atomically and returns its path."""
    from .storage import atomic_write

    settings = meta.get("settings", {})
    scored = [r for r in rows if not r.get("error") and r.get("imacs_g") is not None]
    errors = [r for r in rows if r.get("error")]
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>i2am-fast dataset summary</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "img{max-width:100%;margin:4px;border:1px solid #ddd;vertical-align:top}"
             "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "td.l{text-align:left}p.c{color:#555}</style></head><body>",
             "<h1>IMACS over a dataset</h1>",
             f"<p>{html.escape(str(meta.get('system', '')))}</p>",
             "<p>" + html.escape(f"{settings.get('layout', '?')} at {settings.get('data', '?')}, {settings.get('pairs', '?')} pairs; "
                                 f"{len(rows)} pairs with results ({len(errors)} errors), {len(missing)} without; "
                                 f"{meta.get('world_size', 1)} process(es) in the last run.") + "</p>",
             "<p class='c'>" + html.escape(", ".join(f"{k} {v}" for k, v in sorted(settings.items()) if k not in ("data", "layout", "pairs"))) + "</p>",
             "<h2>Per category</h2><table><tr><th class='l'>category</th><th>pairs</th><th>errors</th>"
             + "".join(f"<th>{s} {w}</th>" for s in ("IMACS_g", "IMACS_r") for w in ("mean", "median", "std", "n")) + "</tr>"]
    for name, entry in table.items():
        cells = "".join(f"<td>{_fmt(entry[s]['mean'])}</td><td>{_fmt(entry[s]['median'])}</td><td>{_fmt(entry[s]['std'])}</td>"
                        f"<td>{entry[s]['count']}</td>" for s in ("imacs_g", "imacs_r"))
        style = " style='font-weight:bold'" if name == "all" else ""
        parts.append(f"<tr{style}><td class='l'>{html.escape(name)}</td><td>{entry['pairs']}</td><td>{entry['errors']}</td>{cells}</tr>")
    parts.append("</table><p class='c'>IMACS (eq. 18, λ = 3, threshold 0.4) lies in [−3, 1]; higher means the attribution "
                 "stays inside the masks: the region to fill for IMACS_g, the garment for IMACS_r.</p>")
    parts.append("<h2>Histograms</h2>")
    for score in ("imacs_g", "imacs_r"):
        path = files.get(f"hist_{score}.png")
        if path and os.path.isfile(path):
            parts.append(f"<img alt='hist {score}' src='{_file_uri(path)}'>")
    count = min(EXTREMES, len(scored) // 2) or min(1, len(scored))
    for score in ("imacs_g", "imacs_r"):
        ranked = sorted(scored, key=lambda r: (r[score], r["pair_id"]))
        for heading, chosen in ((f"Highest {score.replace('imacs', 'IMACS')}", ranked[::-1][:count]),
                                (f"Lowest {score.replace('imacs', 'IMACS')}", ranked[:count])):
            parts.append(f"<h2>{heading}</h2>")
            for row in chosen:
                try:
                    parts.append(f"<img alt='{html.escape(row['pair_id'])}' src='{_uri(pair_picture(out, row))}'>")
                except (OSError, ValueError, KeyError) as e:
                    parts.append(f"<p>{html.escape(row['pair_id'])}: picture unavailable ({html.escape(str(e))})</p>")
    parts.append("<p class='c'>Overlays: the min-max normalised map, resized bicubically and thresholded at 0.4 (eq. 8-9), "
                 "over the image it belongs to.</p>")
    if errors:
        parts.append(f"<h2>Errors ({len(errors)})</h2><table><tr><th class='l'>pair</th><th class='l'>category</th>"
                     "<th class='l'>error</th></tr>")
        parts += [f"<tr><td class='l'>{html.escape(r['pair_id'])}</td><td class='l'>{html.escape(r['category'])}</td>"
                  f"<td class='l'>{html.escape(str(r['error']))}</td></tr>" for r in errors]
        parts.append("</table>")
    if missing:
        parts.append(f"<h2>Without results ({len(missing)})</h2><p>{html.escape(', '.join(missing))}</p>")
    parts.append("</body></html>\n")
    path = os.path.join(out, "summary.html")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("\n".join(parts))

    atomic_write(path, write)
    return path
