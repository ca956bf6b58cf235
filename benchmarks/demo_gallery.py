"""Held-out samples inpainted by the untrained (seeded) and the trained demo model: docs/demo_gallery.png.

    python benchmarks/demo_gallery.py
"""

import os

import torch

from i2am_fast.demo.model import build_demo_model
from i2am_fast.demo.sample import make_sample, masked_person
from i2am_fast.demo.train import HELD_OUT_SEED
from i2am_fast.readout.pictures import contact_sheet, to_pil

SAMPLES = [0, 1, 2, 3]
STEPS, GUIDANCE = 20, 5.0
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "demo_gallery.png")


def main():
    untrained, trained = build_demo_model(pretrained=False), build_demo_model()
    tiles, labels = [], []
    with torch.no_grad():
        for i in SAMPLES:
            s = make_sample(HELD_OUT_SEED + i, trained.config.image_size)
            args = (s["person"][None], s["inpaint_mask"][None], s["pose"][None], s["garment"][None])
            row = [masked_person(s["person"], s["inpaint_mask"]), s["garment"],
                   untrained(*args, steps=STEPS, guidance_scale=GUIDANCE, seed=i)[0],
                   trained(*args, steps=STEPS, guidance_scale=GUIDANCE, seed=i)[0], s["target"]]
            tiles += [to_pil(t) for t in row]
            labels += ["input", "reference", "untrained", "trained", "ground truth"]
    contact_sheet(tiles, labels, columns=5, title="held-out samples: untrained vs trained demo model").save(OUT)
    print(f"written to {os.path.relpath(OUT)}")


if __name__ == "__main__":
    main()
