"""Dataset-scale attribution: every pair of a VITON-HD or DressCode test split traced and scored
with IMACS, split between processes with ``accelerate``, resumable, with an aggregate report
(docs/design.md, "Dataset-scale evaluation").

The Python entry for any system (a diffusers pipeline, an ldm try-on model, ...)::

    from i2am_fast.dataset import System, evaluate_dataset

    def build(device):                       # called once per process
        model = load_my_model().to(device)
        def render(inputs, tracer):           # inside the open trace, once per pair
            return model.try_on(inputs.person, inputs.inpaint_mask, inputs.garment, seed=inputs.seed)
        return System(target=model.unet, render=render, size=(512, 384),
                      trace_options={"num_steps": 50})

    summary = evaluate_dataset(build, data="VITON-HD", layout="viton-hd", out="runs/mine")

Modules: :mod:`.layouts` (pair lists and files), :mod:`.make` (procedural datasets),
:mod:`.storage` (what is kept per pair), :mod:`.runner` (the loop), :mod:`.aggregate` and
:mod:`.page` (tables, statistics, histograms, summary page), :mod:`.systems` (the demo model and
Paint-by-Example), :mod:`.commands` (the command line).
"""

from .layouts import Pair, PairInputs, load_pair, read_pairs
from .make import make_dataset
from .runner import System, evaluate_dataset
from .storage import read_compact

__all__ = ["Pair", "PairInputs", "System", "evaluate_dataset", "load_pair", "make_dataset", "read_compact", "read_pairs"]
