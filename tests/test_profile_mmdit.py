"""The memory profiler's joint-attention editors (flux-kontext, qwen-image-edit, sd3): layer
counts and sizes against hand-computed figures (docs/design.md, "Memory", FLUX.1 Kontext at
1024x1024), and the command's arguments."""

import pytest

from i2am_fast.cli import main
from i2am_fast.tools.memory_mmdit import mmdit_layers
from i2am_fast.tools.memory_model import memory_rows

F32 = 4


def test_flux_kontext_at_1024():
    config, layers = mmdit_layers("flux-kontext", 1024, 1024)
    assert len(layers) == 19 + 38 and config.batch == 1
    n = 512 + 4096 + 4096
    assert all((l.num_queries, l.num_keys, l.map_queries, l.map_keys, l.heads, l.head_dim, l.share, l.grid)
               == (n, n, 4096, 4096, 24, 128, True, (64, 64)) for l in layers)
    rows = memory_rows(layers, batch=1, mapped=1, time_groups=5)
    assert rows[0]["score_matrix"] == 24 * 8704 ** 2 * F32  # 7.27 GB
    assert rows[0]["i2am_state"] == 5 * 24 * (2 * 4096 + 4096) * F32 == 5_898_240  # with share
    assert sum(r["i2am_state"] for r in rows) == 57 * 5_898_240  # 336 MB
    assert sum(r["authors_maps"] for r in rows) == 57 * 5 * 24 * 4096 * 4096 * F32  # 459 GB


def test_reference_size_and_text_length_are_their_own():
    _, layers = mmdit_layers("flux-kontext", 512, 768, reference_size=(1024, 1024), text_tokens=77)
    assert layers[0].grid == (32, 48) and layers[0].map_queries == 32 * 48 and layers[0].map_keys == 4096
    assert layers[0].num_keys == 77 + 32 * 48 + 4096


def test_qwen_image_edit_and_sd3():
    config, layers = mmdit_layers("qwen-image-edit", 1024, 768)
    assert len(layers) == 60 and layers[0].heads == 24 and layers[0].map_keys == 64 * 48
    config, layers = mmdit_layers("sd3", 1024, 768)
    assert len(layers) == 38 and config.batch == 2
    l = layers[0]
    assert (l.num_queries, l.num_keys, l.map_queries, l.map_keys, l.heads, l.head_dim) == (
        64 * 48, 64 * 48 + 64, 64 * 48, 64, 38, 64)
    row = memory_rows([l], batch=2, mapped=1, time_groups=5)[0]
    assert row["score_matrix"] == 2 * 38 * 3072 * 3136 * F32
    assert row["i2am_state"] == 5 * 38 * (2 * 3072 + 64) * F32


@pytest.mark.parametrize("model, size, match", [
    ("flux-kontext", (1000, 1024), "multiple of 16"),
    ("gpt", (1024, 1024), "model must be one of"),
])
def test_bad_arguments(model, size, match):
    with pytest.raises(ValueError, match=match):
        mmdit_layers(model, *size)


def test_profile_command(capsys):
    assert main(["profile", "--model", "flux-kontext", "--height", "1024", "--width", "1024"]) in (None, 0)
    out = capsys.readouterr().out
    assert "FLUX.1 Kontext" in out and "single_transformer_blocks.37.attn" in out and "8704 (4096)" in out
    assert "**all 57 layers**" in out and "7.27 GB" in out
    for argv, match in ((["--model", "sd3", "--measure"], "analytic only"), (["--model", "sd3", "--height", "100"], "multiple")):
        with pytest.raises(SystemExit, match=match):
            main(["profile", *argv])
