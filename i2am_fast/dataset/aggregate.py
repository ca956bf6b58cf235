"""Merging the shards of a dataset run: the results table, statistics and histograms.

Rank 0 calls :func:`summarise` after every rank has finished. It writes into ``OUT``:

- ``results.csv`` and ``results.jsonl``: one row per pair in the pair list's order (pair id,
  category, IMACS_g, IMACS_r, their inside/outside parts, seconds, error, ...);
- ``summary.json``: per category and over all pairs, for IMACS_g and IMACS_r, the mean,
  median, standard deviation (n - 1) and count of the scored pairs, and the error count;
- ``hist_imacs_g.png`` and ``hist_imacs_r.png``: histograms, stacked by category;
- ``summary.html``: one self-contained page (:mod:`.page`).
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import statistics
from typing import Optional, Sequence

__all__ = ["read_shards", "latest_rows", "statistics_table", "histogram", "summarise", "COLUMNS", "SCORES"]

COLUMNS = ("pair_id", "category", "person", "garment", "imacs_g", "imacs_r", "g_inside", "g_outside", "r_inside",
           "r_outside", "seconds", "error", "rank", "seed")
SCORES = ("imacs_g", "imacs_r")
CATEGORY_COLOURS = {"upper_body": (52, 101, 164), "lower_body": (204, 102, 0), "dresses": (115, 153, 0)}


def read_shards(out: str) -> list[dict]:
    """Every row of every shard in ``OUT/shards``, in file order; a line cut short by a crash is skipped."""
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "shards", "*.jsonl"))):
        with open(path, "rb") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and "pair_id" in row:
                    rows.append(row)
    return rows


def latest_rows(rows: Sequence[dict]) -> dict:
    """``{pair_id: row}`` keeping each pair's most recently finished row."""
    latest = {}
    for row in rows:
        old = latest.get(row["pair_id"])
        if old is None or row.get("finished", 0) >= old.get("finished", 0):
            latest[row["pair_id"]] = row
    return latest


def _describe(values: list) -> dict:
    if not values:
        return {"count": 0, "mean": None, "median": None, "std": None}
    return {"count": len(values), "mean": statistics.fmean(values), "median": statistics.median(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def statistics_table(rows: Sequence[dict]) -> dict:
    """``{category or "all": {"pairs", "errors", "imacs_g": {...}, "imacs_r": {...}}}``."""
    groups = {}
    for row in rows:
        groups.setdefault(row["category"], []).append(row)
    table = {}
    for name, members in [*sorted(groups.items()), ("all", list(rows))]:
        ok = [r for r in members if not r.get("error")]
        table[name] = {"pairs": len(members), "errors": len(members) - len(ok),
                       **{s: _describe([r[s] for r in ok if r.get(s) is not None and math.isfinite(r[s])]) for s in SCORES}}
    return table


def histogram(rows: Sequence[dict], score: str, path: str, bins: int = 20, size=(640, 360)) -> None:
    """A histogram PNG of ``score`` over the scored rows, bars stacked by category."""
    from PIL import Image, ImageDraw, ImageFont

    values = [(r[score], r["category"]) for r in rows
              if not r.get("error") and r.get(score) is not None and math.isfinite(r[score])]
    width, height = size
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 50, width - 20, 40, height - 50
    title = f"{score.replace('imacs', 'IMACS')} over {len(values)} pairs"
    draw.text((left, 12), title, fill=(0, 0, 0), font=font)
    draw.line([(left, bottom), (right, bottom)], fill=(0, 0, 0))
    draw.line([(left, top), (left, bottom)], fill=(0, 0, 0))
    if values:
        lo, hi = min(v for v, _ in values), max(v for v, _ in values)
        if hi - lo < 0.1:
            lo, hi = (lo + hi) / 2 - 0.05, (lo + hi) / 2 + 0.05
        step = (hi - lo) / bins
        categories = sorted({c for _, c in values})
        counts = [[0] * bins for _ in categories]
        for v, c in values:
            counts[categories.index(c)][min(int((v - lo) / step), bins - 1)] += 1
        peak = max(sum(col) for col in zip(*counts))
        bar_w = (right - left) / bins
        for b in range(bins):
            y = bottom
            for k, c in enumerate(categories):
                h = (bottom - top) * counts[k][b] / peak
                if h > 0:
                    draw.rectangle([left + b * bar_w + 1, y - h, left + (b + 1) * bar_w - 1, y],
                                   fill=CATEGORY_COLOURS.get(c, (120, 120, 120)))
                y -= h
        for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
            x = left + frac * (right - left)
            draw.line([(x, bottom), (x, bottom + 4)], fill=(0, 0, 0))
            draw.text((x - 14, bottom + 8), f"{lo + frac * (hi - lo):.2f}", fill=(0, 0, 0), font=font)
        draw.text((left - 40, top - 4), str(peak), fill=(0, 0, 0), font=font)
        draw.text((left - 40, bottom - 10), "0", fill=(0, 0, 0), font=font)
        x = left + 200
        for c in categories:
            draw.rectangle([x, 14, x + 10, 24], fill=CATEGORY_COLOURS.get(c, (120, 120, 120)))
            draw.text((x + 14, 12), c, fill=(0, 0, 0), font=font)
            x += 20 + 7 * len(c)
    draw.text(((left + right) // 2 - 60, height - 20), "score (higher: attribution inside the mask)", fill=(0, 0, 0), font=font)
    img.save(path, format="PNG")


def _csv_value(value):
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else value


def summarise(out: str, rows: Sequence[dict], *, missing: Sequence[str] = (), meta: Optional[dict] = None) -> dict:
    """Writes the merged results, statistics, histograms and summary page; returns
    ``{"rows", "statistics", "missing", "files"}``."""
    from .page import write_page
    from .storage import atomic_write

    rows = list(rows)
    files = {}

    def write_text(name: str, fill) -> None:
        path = os.path.join(out, name)

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                fill(f)

        atomic_write(path, write)
        files[name] = path

    def fill_csv(f):
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for row in rows:
            w.writerow([_csv_value(row.get(c)) for c in COLUMNS])

    write_text("results.csv", fill_csv)
    write_text("results.jsonl", lambda f: f.writelines(json.dumps(r) + "\n" for r in rows))
    table = statistics_table(rows)
    summary = {"statistics": table, "missing": list(missing), **(meta or {})}
    write_text("summary.json", lambda f: json.dump(summary, f, indent=1))
    for score in SCORES:
        name = f"hist_{score}.png"
        atomic_write(os.path.join(out, name), lambda tmp, s=score: histogram(rows, s, tmp))
        files[name] = os.path.join(out, name)
    files["summary.html"] = write_page(out, rows, table, files, meta or {}, missing)
    return {"rows": rows, "statistics": table, "missing": list(missing), "files": files}
