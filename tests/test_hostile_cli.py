"""Hostile uses of the ``i2am-fast`` command line: every user error ends in one line on stderr
and a non-zero exit and writes nothing; ``--overwrite`` only replaces what i2am-fast wrote;
every result of a completed run is written (docs/design.md, "Command line and maps files")."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from i2am_fast import AttributionMaps
from i2am_fast.cli import main
from i2am_fast.cli.common import probe_points
from i2am_fast.cli.outdir import MANIFEST
from i2am_fast.readout.maps import LayerInfo


def _user_error(argv, match, capsys=None):
    """``main(argv)`` stops with one line naming the problem."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    code = e.value.code
    if isinstance(code, str):
        message = code
    else:
        assert code not in (0, None)
        message = capsys.readouterr().err if capsys is not None else ""
        message = message.rstrip("\n")
    assert "\n" not in message and match in message, message
    return message


@pytest.fixture()
def maps_file(tmp_path):
    info = LayerInfo(name="attn", generated_grid=(4, 3), reference_grid=(2, 2), reference_offset=0, heads=2, num_keys=4)
    g = torch.Generator().manual_seed(0)
    maps = AttributionMaps([info], {"attn": torch.rand(2, 1, 2, 12, generator=g)}, {"attn": torch.rand(2, 1, 2, 4, generator=g)},
                           {}, latent_grid=(4, 3), time_groups=2, num_steps=2, vae_scale_factor=4)
    path = tmp_path / "in" / "maps.safetensors"
    path.parent.mkdir()
    maps.save(str(path))
    return str(path)


# ------------------------------------------------------------------ the output folder
def test_overwrite_never_empties_the_working_folder(maps_file, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (".", str(work), str(tmp_path)):
        _user_error(["show", maps_file, "--out", out, "--overwrite"], "working folder")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    _user_error(["show", maps_file, "--out", str(tmp_path / "home"), "--overwrite"], "home folder")
    _user_error(["show", maps_file, "--out", "/", "--overwrite"], "root folder")
    _user_error(["show", maps_file, "--out", os.path.dirname(maps_file), "--overwrite"], "holds the input")
    os.symlink(str(tmp_path / "elsewhere"), "link")
    _user_error(["show", maps_file, "--out", "link", "--overwrite"], "symlink")
    assert sorted(os.listdir(work)) == ["link", "notes.txt"] and os.path.isfile(maps_file)


def test_overwrite_removes_only_what_i2am_fast_wrote(maps_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _user_error(["show", maps_file, "--out", str(out), "--overwrite"], "not written by i2am-fast")
    (out / "notes.txt").unlink()
    assert main(["show", maps_file, "--out", str(out)]) == 0
    written = json.load(open(out / MANIFEST))["files"]
    assert "report.html" in written and "maps.safetensors" in written
    (out / "notes.txt").write_text("mine, added later")
    (out / "generated_heads.png").unlink()
    _user_error(["show", maps_file, "--out", str(out)], "--overwrite")
    assert main(["show", maps_file, "--out", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine, added later"
    assert set(os.listdir(out)) == set(written) | {"notes.txt", MANIFEST}


def test_a_failed_run_writes_nothing(maps_file, tmp_path, monkeypatch):
    import i2am_fast.readout.report as report

    def broken(maps, out_dir, *args, **kwargs):
        open(os.path.join(out_dir, "generated.png"), "w").write("half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "write_outputs", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["show", maps_file, "--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("out, match", [("/proc/x/y", "cannot create the output folder"), ("", "--out is empty")])
def test_unusable_output_folders_are_named(maps_file, out, match):
    _user_error(["show", maps_file, "--out", out], match)


# ------------------------------------------------------------------ arguments
@pytest.mark.parametrize("argv, match", [
    (["demo", "--seed", str(2**70)], "--seed must lie in"),
    (["demo", "--seed", "-1"], "--seed must lie in"),
    (["demo", "--guidance", "nan"], "--guidance must be a finite number"),
    (["demo", "--guidance", "inf"], "--guidance must be a finite number"),
    (["demo", "--steps", "2", "--time-groups", "3"], "--time-groups 3 exceeds --steps 2"),
    (["profile", "--heads", "-3"], "--heads must be at least 1"),
    (["profile", "--heads", "0"], "--heads must be at least 1"),
    (["profile", "--probes", "-5"], "--probes must be at least 0"),
])
def test_bad_numbers_end_in_one_line(argv, match, capsys):
    _user_error(argv, match, capsys)


def test_weights_that_are_not_a_checkpoint(tmp_path):
    png = tmp_path / "w.png"
    Image.new("RGB", (4, 4)).save(png)
    out = str(tmp_path / "o")
    _user_error(["demo", "--weights", str(tmp_path / "nope.safetensors"), "--out", out], "does not exist")
    _user_error(["demo", "--weights", str(png), "--out", out], "is not a demo-model checkpoint")
    _user_error(["demo", "--weights", str(tmp_path), "--out", out], "is a folder")
    _user_error(["evaluate", str(png)], "is not a demo-model checkpoint")
    assert not os.path.exists(out)


def test_one_line_on_stderr_from_the_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "i2am_fast", "profile", "--probes", "-5"], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "--probes" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------ run: images and masks
def test_probe_points_on_a_mask_in_two_separate_pieces():
    mask = torch.zeros(12, 8)
    mask[1:3, 2:6] = 1
    mask[9:11, 2:6] = 1
    points = probe_points(mask)
    assert points and all(mask[r, c] == 1 for r, c in points)


@pytest.fixture(scope="module")
def pbe_folder(tmp_path_factory):
    from systems import paint_by_example

    folder = tmp_path_factory.mktemp("pbe")
    paint_by_example().target.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    paths = {}

    def png(name, array):
        Image.fromarray(array).save(d / name)
        paths[name] = str(d / name)

    png("image.png", rng.integers(0, 255, (88, 60, 3), dtype=np.uint8))
    mask = np.zeros((88, 60), np.uint8)
    mask[20:60, 12:36] = 255
    png("mask.png", mask)
    png("black.png", np.zeros((88, 60), np.uint8))
    png("ref.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    png("big_ref.png", rng.integers(0, 255, (1100, 700, 3), dtype=np.uint8))
    return paths


def _run(pbe_folder, inputs, out, *extra, mask="mask.png", image="image.png", reference="ref.png"):
    return ["run", "--pipeline", pbe_folder, "--image", inputs.get(image, image), "--mask", inputs.get(mask, mask),
            "--reference", inputs[reference], "--out", str(out), "--steps", "2", "--time-groups", "2", *extra]


def test_run_takes_its_size_from_an_image_that_is_not_512(pbe_folder, inputs, tmp_path):
    assert main(_run(pbe_folder, inputs, tmp_path / "a")) == 0
    maps = AttributionMaps.load(str(tmp_path / "a" / "maps.safetensors"))
    assert maps.latent_grid == (11, 7)  # 88x60 rounded down to 88x56
    assert main(_run(pbe_folder, inputs, tmp_path / "b", "--height", "64", "--width", "48")) == 0
    assert AttributionMaps.load(str(tmp_path / "b" / "maps.safetensors")).latent_grid == (8, 6)


def test_run_with_an_empty_mask_writes_the_maps_and_marks_imacs_undefined(pbe_folder, inputs, tmp_path, capsys):
    """Also: a large reference is kept with the maps as uint8, at most 1024 pixels on its long side."""
    out = tmp_path / "black"
    assert main(_run(pbe_folder, inputs, out, mask="black.png", reference="big_ref.png")) == 0
    garment = AttributionMaps.load(str(out / "maps.safetensors")).images["garment"]
    assert tuple(garment.shape) == (3, 1024, 652)
    assert os.path.getsize(out / "maps.safetensors") < 4 * 1024 * 1024
    assert "--mask is empty" in capsys.readouterr().err
    assert {"maps.safetensors", "report.html", "imacs.json"} <= set(os.listdir(out))
    scores = json.load(open(out / "imacs.json"))
    assert scores["imacs_g"] is None and "empty" in scores["undefined"]["g"]
    assert "undefined" in open(out / "report.html").read()


def _png_header_only(path, width, height):
    """A PNG whose header claims ``width x height`` (a decompression bomb's first bytes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return str(path)


def test_run_refuses_huge_and_unreadable_inputs_before_any_work(pbe_folder, inputs, tmp_path):
    bomb = _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    out = tmp_path / "o"
    _user_error(_run(pbe_folder, inputs, out, image=bomb), "--max-pixels")
    _user_error(_run(pbe_folder, inputs, out, "--max-pixels", "1000"), "above the limit of 1,000")
    _user_error(_run(pbe_folder, inputs, out, image=str(tmp_path)), "is a folder")
    _user_error(_run(pbe_folder, inputs, out, "--height", "60"), "multiple of 8")
    assert not out.exists()
