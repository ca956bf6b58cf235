"""``i2am-fast show``: the pictures and report again from a saved maps file, no model needed."""

from __future__ import annotations

import os

from .common import Progress, summary
from .outdir import OutputFolder


def add_parser(sub) -> None:
    show = sub.add_parser("show", help="redraw the pictures and report from a saved maps.safetensors",
                          description="Reads maps written by demo/run (or AttributionMaps.save) and writes the pictures, "
                                      "IMACS (when the masks were saved with the maps) and report.html again.")
    show.add_argument("maps", help="a maps.safetensors file")
    show.add_argument("--out", default=None, help="output folder (default: i2am-fast-show)")
    show.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    show.set_defaults(func=main)


def main(args) -> None:
    from ..readout.maps import AttributionMaps
    from ..readout.report import write_outputs

    if os.path.isdir(args.maps):
        raise SystemExit(f"error: {args.maps} is a folder; pass a maps.safetensors file.")
    if not os.path.isfile(args.maps):
        raise SystemExit(f"error: {args.maps} does not exist.")
    try:
        maps = AttributionMaps.load(args.maps)
    except ValueError as e:  # names the file and the field
        raise SystemExit(f"error: {e}")
    except Exception as e:  # noqa: BLE001
        raise SystemExit(f"error: {args.maps} is not an i2am_fast maps file: {e}")
    out = OutputFolder(args.out, args.overwrite, inputs=[args.maps])
    with out.staging() as stage:
        written = write_outputs(maps, stage, maps.images, title="i2am-fast show", notes=[f"Maps read from {args.maps}."],
                                progress=Progress("pictures and report"))
    summary(args.out, written)
