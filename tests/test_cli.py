"""The i2am-fast command line end to end, on tiny sizes."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from i2am_fast import AttributionMaps
from i2am_fast.cli import main

DEMO_ARGS = ["--steps", "3", "--height", "64", "--width", "48", "--time-groups", "3"]
EXPECTED = {
    "generated.png", "person.png", "inpaint_mask.png", "garment.png", "garment_mask.png",
    "generated_map.png", "generated_overlay.png", "reference_map.png", "reference_overlay.png",
    "generated_time_groups.png", "reference_time_groups.png", "generated_heads.png", "reference_heads.png",
    "specific_reference.png", "maps.safetensors", "imacs.json", "report.html",
}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "demo")
    assert main(["demo", "--out", out, *DEMO_ARGS]) == 0
    return out


def test_demo_writes_every_output(demo_dir):
    assert EXPECTED <= set(os.listdir(demo_dir))
    scores = json.load(open(os.path.join(demo_dir, "imacs.json")))
    assert set(scores) >= {"imacs_g", "imacs_r", "parts", "lambda", "threshold"}
    assert -3.0 <= scores["imacs_g"] <= 1.0 and -3.0 <= scores["imacs_r"] <= 1.0
    report = open(os.path.join(demo_dir, "report.html")).read()
    # Self-contained: every picture embedded, none linked.
    assert report.count("src='data:image/png;base64,") == len([n for n in EXPECTED if n.endswith(".png")])
    assert "src='http" not in report and "IMACS" in report
    maps = AttributionMaps.load(os.path.join(demo_dir, "maps.safetensors"))
    assert maps.time_groups == 3 and maps.num_steps == 3 and maps.latent_grid == (16, 12)
    assert maps.reference_grid == (8, 8) and len(maps.probe_points) >= 1
    with Image.open(os.path.join(demo_dir, "generated_time_groups.png")) as sheet:
        assert sheet.width > 3 * 100  # three labelled tiles side by side


def test_demo_is_deterministic(demo_dir, tmp_path):
    out = str(tmp_path / "again")
    main(["demo", "--out", out, *DEMO_ARGS])
    a = AttributionMaps.load(os.path.join(demo_dir, "maps.safetensors"))
    b = AttributionMaps.load(os.path.join(out, "maps.safetensors"))
    assert torch.equal(a.generated(normalize=False), b.generated(normalize=False))
    assert torch.equal(a.images["generated"], b.images["generated"])


def test_show_round_trips_saved_maps(demo_dir, tmp_path):
    out = str(tmp_path / "show")
    assert main(["show", os.path.join(demo_dir, "maps.safetensors"), "--out", out]) == 0
    assert EXPECTED <= set(os.listdir(out))
    assert json.load(open(os.path.join(out, "imacs.json"))) == json.load(open(os.path.join(demo_dir, "imacs.json")))
    for name in ("generated_map.png", "reference_heads.png", "specific_reference.png"):
        a = np.asarray(Image.open(os.path.join(demo_dir, name)))
        b = np.asarray(Image.open(os.path.join(out, name)))
        assert np.array_equal(a, b), name
    a = AttributionMaps.load(os.path.join(demo_dir, "maps.safetensors"))
    b = AttributionMaps.load(os.path.join(out, "maps.safetensors"))
    for point in a.probe_points:
        assert torch.equal(a.specific_reference(point), b.specific_reference(point))


def test_maps_record_the_vae_scale_factor_and_the_report_uses_it(demo_dir, tmp_path):
    """The demo model's codec pools by 4, not Stable Diffusion's 8: the maps carry that factor
    through save/load, and without pictures the report draws the generated map at
    latent grid x factor pixels."""
    from i2am_fast.demo.model import DemoConfig
    from i2am_fast.readout.report import write_outputs

    maps = AttributionMaps.load(os.path.join(demo_dir, "maps.safetensors"))
    factor = DemoConfig().vae_scale_factor
    assert maps.vae_scale_factor == factor != 8
    bare = AttributionMaps(maps.layers, maps._generated, maps._reference, maps._probes, latent_grid=maps.latent_grid,
                           time_groups=maps.time_groups, num_steps=maps.num_steps, vae_scale_factor=factor)
    before = dict(vars(bare))
    write_outputs(bare, str(tmp_path))
    assert vars(bare).keys() == before.keys() and all(vars(bare)[k] is before[k] for k in before), \
        "the report changed the caller's maps"
    with Image.open(tmp_path / "generated_map.png") as img:
        assert (img.height, img.width) == (maps.latent_grid[0] * factor, maps.latent_grid[1] * factor)
    assert AttributionMaps.load(str(tmp_path / "maps.safetensors")).vae_scale_factor == factor


def test_maps_files_without_a_vae_scale_factor_read_as_8(demo_dir, tmp_path):
    """Files written before the factor was recorded: the factor the report used to assume."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(os.path.join(demo_dir, "maps.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["i2am_fast"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del meta["vae_scale_factor"]
    old = str(tmp_path / "old.safetensors")
    save_file(tensors, old, metadata={"i2am_fast": json.dumps(meta)})
    assert AttributionMaps.load(old).vae_scale_factor == 8


def test_existing_output_folder_is_refused_without_overwrite(demo_dir, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(SystemExit, match="--overwrite"):
        main(["show", os.path.join(demo_dir, "maps.safetensors"), "--out", str(out)])
    # --overwrite replaces only what i2am-fast wrote (tests/test_hostile_cli.py has the rest)
    with pytest.raises(SystemExit, match="not written by i2am-fast"):
        main(["show", os.path.join(demo_dir, "maps.safetensors"), "--out", str(out), "--overwrite"])
    assert (out / "keep.txt").read_text() == "x"


@pytest.mark.parametrize(
    "argv, match",
    [
        (["demo", "--height", "62"], "multiples of 4"),
        (["show", "missing.safetensors"], "does not exist"),
    ],
)
def test_bad_arguments(argv, match, tmp_path):
    with pytest.raises(SystemExit, match=match):
        main([*argv, "--out", str(tmp_path / "o")])


def test_show_rejects_a_file_that_is_not_maps(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(SystemExit, match="not an i2am_fast maps file"):
        main(["show", str(bad), "--out", str(tmp_path / "o")])


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "i2am_fast", "--help"], capture_output=True, text=True, check=True)
    for command in ("demo", "run", "show"):
        assert command in out.stdout


# ------------------------------------------------------------------ run: a local Paint-by-Example pipeline
@pytest.fixture(scope="module")
def pbe_folder(tmp_path_factory):
    from systems import paint_by_example

    folder = tmp_path_factory.mktemp("pbe")
    paint_by_example().target.save_pretrained(str(folder))
    return str(folder)


def _png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    image = _png(d / "image.png", rng.integers(0, 255, (80, 48, 3), dtype=np.uint8))
    mask_a = np.zeros((80, 48), np.uint8)
    mask_a[20:60, 12:36] = 255
    mask = _png(d / "mask.png", mask_a)
    reference = _png(d / "ref.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    ref_mask_a = np.zeros((32, 32), np.uint8)
    ref_mask_a[8:24, 8:24] = 255
    reference_mask = _png(d / "ref_mask.png", ref_mask_a)
    rgb_mask = _png(d / "rgb_mask.png", np.stack([mask_a] * 3, -1))
    small_mask = _png(d / "small_mask.png", mask_a[:40])
    return dict(image=image, mask=mask, reference=reference, reference_mask=reference_mask,
                rgb_mask=rgb_mask, small_mask=small_mask, text=str(d / "notes.txt"))


def _run_args(pbe_folder, inputs, out, **override):
    args = dict(pipeline=pbe_folder, image=inputs["image"], mask=inputs["mask"], reference=inputs["reference"])
    args.update(override)
    argv = ["run", "--out", str(out), "--steps", "3", "--height", "80", "--width", "48"]
    for k, v in args.items():
        argv += [f"--{k.replace('_', '-')}", v]
    return argv


def test_run_on_a_local_paint_by_example_pipeline(pbe_folder, run_inputs, tmp_path):
    out = tmp_path / "run"
    assert main(_run_args(pbe_folder, run_inputs, out, reference_mask=run_inputs["reference_mask"])) == 0
    assert EXPECTED <= set(os.listdir(out))
    maps = AttributionMaps.load(str(out / "maps.safetensors"))
    assert maps.reference_grid == (1, 1)  # Paint-by-Example attends to one token
    assert maps.latent_grid == (10, 6) and maps.num_steps == 3


def test_run_bad_inputs(pbe_folder, run_inputs, tmp_path):
    open(run_inputs["text"], "w").write("hello")
    cases = [
        (dict(mask=run_inputs["rgb_mask"]), "single-channel"),
        (dict(mask=run_inputs["small_mask"]), "resize the mask"),
        (dict(image=str(tmp_path / "nope.png")), "does not exist"),
        (dict(reference=run_inputs["text"]), "not a readable image"),
        (dict(pipeline=str(tmp_path)), "not a diffusers pipeline"),
    ]
    for override, match in cases:
        with pytest.raises(SystemExit, match=match):
            main(_run_args(pbe_folder, run_inputs, tmp_path / "o", **override))


# ------------------------------------------------------------------ the report in a real browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install chromium): report screenshot skipped")
def test_report_renders_in_headless_chromium(demo_dir, tmp_path):
    """Every <img> of the report has loaded (naturalWidth > 0) in headless Chromium, and the
    screenshot is not blank."""
    report = os.path.abspath(os.path.join(demo_dir, "report.html"))
    # Append a script that replaces the page title with the count of images that failed to load.
    checked = tmp_path / "checked.html"
    checked.write_text(open(report).read().replace(
        "</body>", "<script>window.onload=()=>{const bad=[...document.images].filter(i=>!i.complete||i.naturalWidth==0);"
                   "document.title='loaded:'+document.images.length+':broken:'+bad.length;"
                   "document.body.setAttribute('data-broken',bad.length);};</script></body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([CHROMIUM, *flags, "--virtual-time-budget=5000", "--dump-dom", f"file://{checked}"],
                         capture_output=True, text=True, timeout=120)
    assert "data-broken=\"0\"" in dom.stdout, dom.stdout[-2000:] + dom.stderr[-2000:]
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,2400", f"file://{report}"],
                   capture_output=True, timeout=120)
    with Image.open(shot) as img:
        a = np.asarray(img.convert("RGB"))
    assert a.std() > 10  # not a blank page
