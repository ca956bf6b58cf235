"""``i2am-fast run --pipeline DIR`` on a local FLUX.1 Kontext folder (the tiny seeded system of
``pipeline_systems_mmdit``, saved without text encoders: the prompt comes as embeddings)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline_systems_mmdit as systems
from i2am_fast import AttributionMaps
from i2am_fast.cli import main


@pytest.fixture(scope="module")
def kontext_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kontext")
    system = systems.flux_kontext()
    system.pipe.save_pretrained(str(folder / "pipe"))
    g = torch.Generator().manual_seed(0)
    torch.save({"prompt_embeds": torch.randn(1, 8, systems.FLUX_TEXT_DIM, generator=g),
                "pooled_prompt_embeds": torch.randn(1, systems.FLUX_POOLED_DIM, generator=g)}, folder / "prompt.pt")
    systems.random_image(192, 256, seed=0).save(folder / "ref.png")
    mask = np.zeros((256, 192), np.uint8)
    mask[64:192, 48:144] = 255
    Image.fromarray(mask).save(folder / "ref_mask.png")
    return folder, system


def test_run_on_a_local_flux_kontext_folder(kontext_folder, tmp_path):
    folder, system = kontext_folder
    out = tmp_path / "run"
    argv = ["run", "--pipeline", str(folder / "pipe"), "--reference", str(folder / "ref.png"),
            "--reference-mask", str(folder / "ref_mask.png"), "--prompt-embeds", str(folder / "prompt.pt"),
            "--height", "192", "--width", "256", "--steps", "2", "--out", str(out)]
    assert main(argv) == 0
    files = set(os.listdir(out))
    assert {"generated.png", "garment.png", "generated_map.png", "reference_map.png", "share_map.png",
            "maps.safetensors", "report.html"} <= files
    maps = AttributionMaps.load(str(out / "maps.safetensors"))
    assert maps.latent_grid == system.target_grid and maps.num_steps == 2
    assert maps.reference().shape == tuple(system.reference_grid)  # the Kontext image's own grid
    assert len(maps.layer_names()) == 4  # 2 double-stream + 2 single-stream blocks
    assert maps.sources() == ["kontext"] and maps.share().shape == tuple(system.target_grid)


@pytest.mark.parametrize("drop, add, match", [
    ("--prompt-embeds", [], "exactly one of --prompt and --prompt-embeds"),
    (None, ["--prompt", "a cat"], "exactly one of"),
    (None, ["--image", "x.png"], "Paint-by-Example inputs"),
    ("--height", [], "both --height and --width"),
])
def test_run_kontext_bad_arguments(kontext_folder, tmp_path, drop, add, match):
    folder, _ = kontext_folder
    args = {"--pipeline": str(folder / "pipe"), "--reference": str(folder / "ref.png"),
            "--prompt-embeds": str(folder / "prompt.pt"), "--height": "192", "--width": "256"}
    if drop:
        del args[drop]
    argv = ["run", "--out", str(tmp_path / "o"), "--steps", "1"] + [x for kv in args.items() for x in kv] + add
    with pytest.raises(SystemExit, match=match):
        main(argv)


def test_run_refuses_a_folder_of_another_pipeline(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(SystemExit, match="drives"):
        main(["run", "--pipeline", str(tmp_path), "--reference", "x.png"])
