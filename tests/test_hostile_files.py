"""Hostile maps files and masks: inconsistent or garbled files are refused on load naming the
file and the field; pictures are stored as uint8 under keys no layer can take; saving leaves
no stray files and gives the file the process's usual mode; masks of every PIL mode read to
[0, 1] (docs/design.md, "Command line and maps files")."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from i2am_fast import AttributionMaps
from i2am_fast.readout.maps import LayerInfo
from i2am_fast.readout.pictures import mask_values


def _maps(name="down.attn", images=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    info = LayerInfo(name=name, generated_grid=(4, 3), reference_grid=(2, 2), reference_offset=1, heads=2, num_keys=5)
    return AttributionMaps([info], {name: torch.rand(2, 1, 2, 12, generator=g)}, {name: torch.rand(2, 1, 2, 5, generator=g)},
                           {name: torch.rand(2, 1, 2, 1, 5, generator=g)}, latent_grid=(8, 6), time_groups=2, num_steps=4,
                           probe_points=[(1, 2)], images=images)


def _contents(path):
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["i2am_fast"]), {k: f.get_tensor(k) for k in f.keys()}


def _rewrite(path, out, edit_meta=None, edit_tensors=None, raw_meta=None):
    meta, tensors = _contents(path)
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, out, metadata={"i2am_fast": raw_meta if raw_meta is not None else json.dumps(meta)})
    return out


@pytest.fixture()
def saved(tmp_path):
    path = str(tmp_path / "maps.safetensors")
    _maps().save(path)
    return path


def _set_layer(field, value):
    return lambda meta: meta["layers"][0].__setitem__(field, value)


@pytest.mark.parametrize("edit_meta, edit_tensors, raw, why", [
    (_set_layer("generated_grid", [5, 3]), None, None, "tensor 'down.attn::generated' has shape"),
    (_set_layer("reference_offset", 0), None, None, "tensor 'down.attn::reference' has shape"),
    (None, lambda t: t.__setitem__("down.attn::reference", torch.rand(2, 1, 2, 7)), None, "'down.attn::reference'"),
    (_set_layer("reference_offset", 3), None, None, "exceed num_keys"),
    (lambda m: m.__setitem__("probe_points", [[8, 0]]), None, None, "lies off the latent grid"),
    (lambda m: m.__setitem__("num_steps", 0), None, None, "'num_steps'"),
    (lambda m: m.__setitem__("latent_grid", [300000, 300000]), None, None, "'latent_grid'"),
    (lambda m: (m.__setitem__("latent_grid", [2, 2]), m.__setitem__("probe_points", [])), None, None, "finer than latent_grid"),
    (lambda m: m.pop("cfg"), None, None, "lacks the field 'cfg'"),
    (lambda m: m["layers"].append(dict(m["layers"][0])), None, None, "appears twice"),
    (lambda m: m["layers"][0].pop("heads"), None, None, "'heads'"),
    (None, None, "{not json", "metadata is not JSON"),
    (None, None, "[1, 2]", "not a JSON object"),
    (None, lambda t: t.pop("down.attn::probes"), None, "'down.attn::probes' is missing"),
])
def test_inconsistent_files_are_refused_naming_the_file_and_the_field(saved, tmp_path, edit_meta, edit_tensors, raw, why):
    bad = _rewrite(saved, str(tmp_path / "bad.safetensors"), edit_meta, edit_tensors, raw)
    with pytest.raises(ValueError) as e:
        AttributionMaps.load(bad)
    assert str(e.value).startswith(f"not an i2am_fast maps file: {bad}: ") and why in str(e.value), str(e.value)


def test_a_file_that_is_not_safetensors_is_named(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match=f"not an i2am_fast maps file: {bad}: not a safetensors file"):
        AttributionMaps.load(str(bad))


def test_a_layer_named_image_keeps_its_maps_and_the_pictures(tmp_path):
    picture = torch.rand(3, 8, 6)
    maps = _maps(name="image", images={"generated": picture})
    path = str(tmp_path / "m.safetensors")
    maps.save(path)
    back = AttributionMaps.load(path)
    assert torch.equal(back._generated["image"], maps._generated["image"])
    assert back.images["generated"].shape == picture.shape


def test_pictures_are_stored_as_uint8_and_read_back_in_range(tmp_path):
    picture = torch.rand(3, 40, 30)
    path = str(tmp_path / "m.safetensors")
    _maps(images={"generated": picture}).save(path)
    _, tensors = _contents(path)
    assert tensors["image::generated::picture"].dtype == torch.uint8
    back = AttributionMaps.load(path).images["generated"]
    assert back.dtype == torch.float32 and (back - picture).abs().max() <= 0.5 / 255 + 1e-6


def test_saving_gives_the_usual_mode_and_removes_what_a_killed_save_left(tmp_path):
    stale = tmp_path / ".i2am-fast-save-999999999"
    stale.mkdir()
    (stale / ".tmpABC").write_bytes(b"x" * 1000)
    path = tmp_path / "maps.safetensors"
    _maps().save(str(path))
    (tmp_path / "other.txt").write_text("x")
    assert sorted(os.listdir(tmp_path)) == ["maps.safetensors", "other.txt"]
    assert (path.stat().st_mode & 0o777) == ((tmp_path / "other.txt").stat().st_mode & 0o777)


@pytest.mark.parametrize("mode, values, expected", [
    ("I;16", [0, 257, 65535], [0.0, 257 / 65535, 1.0]),
    ("F", [0.0, 0.3, 1.0], [0.0, 0.3, 1.0]),
    ("F", [0.0, 100.0, 255.0], [0.0, 100 / 255, 1.0]),
    ("L", [0, 128, 255], [0.0, 128 / 255, 1.0]),
])
def test_masks_of_every_mode_read_to_unit_range(mode, values, expected):
    dtype = {"I;16": np.uint16, "F": np.float32, "L": np.uint8}[mode]
    img = Image.fromarray(np.array([values], dtype=dtype), mode=mode if mode != "I;16" else None)
    if mode == "I;16":
        assert img.mode.startswith("I")
    np.testing.assert_allclose(mask_values(img)[0], expected, rtol=1e-6)
    # 257/65535 (0.4 %) is outside the region, 0.3 is outside, 1.0 inside
    assert (mask_values(img) > 0.5).sum() == sum(e > 0.5 for e in expected)


def test_a_16_bit_png_mask_is_read_from_disk_without_clipping(tmp_path):
    a = np.zeros((4, 4), np.uint16)
    a[:2] = 257  # 0.4 % grey: outside
    a[2:] = 65535
    path = tmp_path / "m.png"
    Image.fromarray(a).save(path)
    with Image.open(path) as img:
        values = mask_values(img)
    assert (values > 0.5).sum() == 8 and values.max() == 1.0
