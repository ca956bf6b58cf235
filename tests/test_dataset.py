"""Dataset-scale evaluation: layouts, sharding across processes, resuming, error rows, aggregation.

Everything runs on procedural datasets at 64x48 with the demo model and 3 denoising steps; the
multi-process case starts two real processes with torchrun (gloo)."""

import csv
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import i2am_fast
from i2am_fast.cli import main
from i2am_fast.dataset import System, evaluate_dataset, load_pair, make_dataset, read_compact, read_pairs
from i2am_fast.dataset.layouts import DRESSCODE_LABELS, DRESSCODE_MASK_CLASSES, MASK_DILATION

SIZE = ["--height", "64", "--width", "48"]
RUN = ["--layout", "viton-hd", "--demo-model", "--steps", "3", *SIZE]
SCORES = ("imacs_g", "imacs_r", "g_inside", "g_outside", "r_inside", "r_outside")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread, as in the launched processes (OMP_NUM_THREADS=1): the same rounding, and no
    oversubscription of the shared cores by several processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(out):
    with open(os.path.join(out, "results.csv")) as f:
        return {r["pair_id"]: r for r in csv.DictReader(f)}


def _shard_rows(out):
    rows = []
    for name in sorted(os.listdir(os.path.join(out, "shards"))):
        with open(os.path.join(out, "shards", name)) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def _same_scores(a, b, pair_ids):
    for pid in pair_ids:
        for c in SCORES:
            assert float(a[pid][c]) == pytest.approx(float(b[pid][c]), rel=1e-6, abs=1e-9), (pid, c)


@pytest.fixture(scope="module")
def viton(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("data") / "viton")
    make_dataset(folder, "viton-hd", 12, (64, 48))
    return folder


@pytest.fixture(scope="module")
def reference(viton, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "one")
    assert main(["evaluate-dataset", "--data", viton, *RUN, "--out", out]) == 0
    return out


# ------------------------------------------------------------------------------ layouts
def test_make_dataset_is_deterministic_and_readable(tmp_path):
    for layout in ("viton-hd", "dresscode"):
        a, b = str(tmp_path / f"{layout}-a"), str(tmp_path / f"{layout}-b")
        main(["make-dataset", "--layout", layout, "--pairs", "6", "--out", a, "--height", "48", "--width", "32"])
        make_dataset(b, layout, 6, (48, 32))
        files = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs)
        assert files == sorted(os.path.relpath(os.path.join(d, f), b) for d, _, fs in os.walk(b) for f in fs)
        for name in files:
            assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read(), name
        paired, unpaired = read_pairs(a, layout, "paired"), read_pairs(a, layout, "unpaired")
        assert len(paired) == len(unpaired) == 6
        assert all(os.path.basename(p.garment).split("_")[0] == os.path.basename(p.person).split("_")[0] for p in paired)
        assert all(os.path.basename(p.garment).split("_")[0] != os.path.basename(p.person).split("_")[0] for p in unpaired)
        for pair in paired:
            x = load_pair(pair, (48, 32), seed=0)
            assert x.person.shape == x.garment.shape == (3, 48, 32) and x.inpaint_mask.shape == (48, 32)
            assert set(x.inpaint_mask.unique().tolist()) == {0.0, 1.0} and set(x.garment_mask.unique().tolist()) == {0.0, 1.0}
            assert x.labels is not None and x.body_parts.abs().sum() > 0
    cats = [p.category for p in read_pairs(str(tmp_path / "dresscode-a"), "dresscode")]
    assert cats == ["upper_body"] * 2 + ["lower_body"] * 2 + ["dresses"] * 2


def test_dresscode_mask_is_the_category_classes_dilated(tmp_path):
    folder = str(tmp_path / "dc")
    make_dataset(folder, "dresscode", 3, (100, 75))
    for pair in read_pairs(folder, "dresscode"):
        labels = np.array(Image.open(pair.labels))
        inside = np.isin(labels, [DRESSCODE_LABELS[c] for c in DRESSCODE_MASK_CLASSES[pair.category]])
        r = round(MASK_DILATION * labels.shape[0])
        padded = np.pad(inside, r)
        expected = np.zeros_like(inside)  # brute-force dilation by a (2r+1)^2 square
        for dy in range(2 * r + 1):
            for dx in range(2 * r + 1):
                expected |= padded[dy:dy + inside.shape[0], dx:dx + inside.shape[1]]
        x = load_pair(pair, labels.shape, seed=0)
        assert np.array_equal(x.inpaint_mask.numpy() > 0.5, expected), pair.category
        garment = np.array(Image.open(pair.garment).convert("RGB"))
        assert np.array_equal(x.garment_mask.numpy() > 0.5, (garment < 240).any(-1))


def test_wrong_layout_and_missing_pairs_file_fail_at_once(viton, tmp_path):
    dc = str(tmp_path / "dc")
    make_dataset(dc, "dresscode", 3, (48, 32))
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="looks like --layout dresscode"):
        main(["evaluate-dataset", "--data", dc, *RUN, "--out", str(out)])
    with pytest.raises(SystemExit, match="looks like --layout viton-hd"):
        main(["evaluate-dataset", "--data", viton, "--layout", "dresscode", "--demo-model", "--out", str(out)])
    broken = str(tmp_path / "no-pairs")
    shutil.copytree(viton, broken)
    os.remove(os.path.join(broken, "test_pairs.txt"))
    with pytest.raises(SystemExit, match="the pairs file test_pairs.txt is missing"):
        main(["evaluate-dataset", "--data", broken, *RUN, "--out", str(out)])
    os.remove(os.path.join(dc, "lower_body", "test_pairs_unpaired.txt"))
    with pytest.raises(SystemExit, match="lower_body/test_pairs_unpaired.txt is missing"):
        main(["evaluate-dataset", "--data", dc, "--layout", "dresscode", "--pairs", "unpaired", "--demo-model", "--out", str(out)])
    assert not out.exists()  # nothing was started


# ------------------------------------------------------------------------------ processes
def test_two_processes_give_the_same_table_and_render_each_pair_once(viton, reference, tmp_path):
    out = str(tmp_path / "two")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "i2am_fast", "evaluate-dataset", "--data", viton, *RUN, "--out", out]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one, two = _rows(reference), _rows(out)
    assert set(one) == set(two) and len(two) == 12
    _same_scores(one, two, one)
    shard = _shard_rows(out)
    assert sorted(r["pair_id"] for r in shard) == sorted(two)  # every pair rendered exactly once
    order = [p.id for p in read_pairs(viton, "viton-hd")]
    assert [r["pair_id"] for r in shard if r["rank"] == 0] == order[:6]  # contiguous halves, one per rank
    assert [r["pair_id"] for r in shard if r["rank"] == 1] == order[6:]
    assert {r["world_size"] for r in shard} == {2}


GUARD_SCRIPT = """
import importlib.util, os, sys
from accelerate import PartialState
spec = importlib.util.spec_from_file_location("processes", sys.argv[2])  # the module alone: a quick start
processes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(processes)
state = PartialState()  # plain: on a machine without GPUs no process group is counted
with open(os.path.join(sys.argv[1], os.environ["LOCAL_RANK"]), "w") as f:
    f.write(f"{state.process_index} {state.num_processes}")
processes.check_world(state)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with GPUs plain PartialState() initialises NCCL and works")
def test_a_launch_without_process_group_is_refused(viton, tmp_path, monkeypatch):
    """Plain PartialState() under torchrun on CPU: both processes take themselves for rank 0 of 1
    (accelerate's real behaviour), and the guard stops them."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "--no-python", sys.executable, "-c", GUARD_SCRIPT, str(tmp_path),
           os.path.join(os.path.dirname(i2am_fast.__file__), "dataset", "processes.py")]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    for local_rank in ("0", "1"):
        assert open(tmp_path / local_rank).read() == "0 1"  # each: rank 0 of 1
    assert done.stderr.count("every process would take itself for rank 0") >= 2, done.stderr[-3000:]

    class Uninitialised:  # what that launch gives, handed to the command
        num_processes, process_index, is_main_process = 1, 0, True

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("accelerate.PartialState", lambda *a, **k: Uninitialised())
    with pytest.raises(SystemExit, match="the launcher started 2 processes"):
        main(["evaluate-dataset", "--data", viton, *RUN, "--out", str(tmp_path / "o")])


# ------------------------------------------------------------------------------ resuming, errors
def test_a_killed_run_resumes_without_redoing_pairs(viton, reference, tmp_path):
    out = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "i2am_fast", "evaluate-dataset", "--data", viton, *RUN, "--out", out, "--limit", "8"]
    done = subprocess.run(cmd, env={**ENV, "I2AM_FAST_DATASET_CRASH_AFTER": "4"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 75, done.stderr[-3000:]
    first = _shard_rows(out)
    assert len(first) == 4
    order = [p for p in read_pairs(viton, "viton-hd")][:8]
    partial = os.path.join(out, "pairs", "upper_body", order[4].id)
    assert os.listdir(partial) == ["generated.png"]  # killed half way through the fifth pair
    kept = {f: os.stat(os.path.join(out, f)) for r in first for f in r["files"]}
    assert main(["evaluate-dataset", "--data", viton, *RUN, "--out", out, "--limit", "8"]) == 0
    rows = _shard_rows(out)
    assert sorted(r["pair_id"] for r in rows) == sorted(p.id for p in order)  # each exactly once
    for f, st in kept.items():
        now = os.stat(os.path.join(out, f))
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f
    assert sorted(os.listdir(partial)) == ["generated.png", "maps.safetensors"]
    _same_scores(_rows(reference), _rows(out), [p.id for p in order])
    # A third run has nothing left to do: no model is built, nothing is rewritten.
    assert main(["evaluate-dataset", "--data", viton, *RUN, "--out", out, "--limit", "8"]) == 0
    assert len(_shard_rows(out)) == 8
    with pytest.raises(SystemExit, match="other settings"):
        main(["evaluate-dataset", "--data", viton, *RUN[:-4], "--steps", "4", *SIZE, "--out", out])


def test_a_corrupted_pair_becomes_an_error_row_and_the_rest_is_unchanged(viton, reference, tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(viton, data)
    pairs = read_pairs(data, "viton-hd")
    with open(pairs[2].person, "wb") as f:
        f.write(b"\xff\xd8 this is not a jpeg")
    Image.new("L", (20, 30), 255).save(pairs[7].mask)
    out = str(tmp_path / "out")
    assert main(["evaluate-dataset", "--data", data, *RUN, "--out", out]) == 0
    rows = _rows(out)
    assert len(rows) == 12
    assert "not a readable image" in rows[pairs[2].id]["error"] and "00002_00.jpg" in rows[pairs[2].id]["error"]
    assert "20x30 but the person image is 48x64" in rows[pairs[7].id]["error"]
    assert rows[pairs[2].id]["imacs_g"] == "" and rows[pairs[7].id]["imacs_r"] == ""
    others = [p.id for i, p in enumerate(pairs) if i not in (2, 7)]
    assert all(rows[i]["error"] == "" for i in others)
    _same_scores(_rows(reference), rows, others)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["statistics"]["all"]["errors"] == 2 and summary["statistics"]["all"]["imacs_g"]["count"] == 10
    assert pairs[7].id in open(os.path.join(out, "summary.html")).read()
    # Repaired, and rerun with --retry-errors: only the two error pairs are rendered again.
    shutil.copy(os.path.join(viton, "test", "image", "00002_00.jpg"), pairs[2].person)
    shutil.copy(os.path.join(viton, "test", "agnostic-mask", "00007_00_mask.png"), pairs[7].mask)
    assert main(["evaluate-dataset", "--data", data, *RUN, "--out", out, "--retry-errors"]) == 0
    redone = [r["pair_id"] for r in _shard_rows(out)][12:]
    assert sorted(redone) == sorted([pairs[2].id, pairs[7].id])
    _same_scores(_rows(reference), _rows(out), [p.id for p in pairs])


# ------------------------------------------------------------------------------ outputs
def test_results_statistics_and_summary_page(reference):
    rows = list(_rows(reference).values())
    assert [r["pair_id"] for r in rows] == [p.id for p in read_pairs(json.load(open(os.path.join(reference, "run.json")))["settings"]["data"], "viton-hd")]
    jsonl = [json.loads(line) for line in open(os.path.join(reference, "results.jsonl"))]
    assert [r["pair_id"] for r in jsonl] == [r["pair_id"] for r in rows]
    stats = json.load(open(os.path.join(reference, "summary.json")))["statistics"]
    for score in ("imacs_g", "imacs_r"):
        values = [float(r[score]) for r in rows]
        s = stats["upper_body"][score]
        assert s["count"] == 12
        assert s["mean"] == pytest.approx(float(np.mean(values)), rel=1e-12)
        assert s["median"] == pytest.approx(float(np.median(values)), rel=1e-12)
        assert s["std"] == pytest.approx(float(np.std(values, ddof=1)), rel=1e-12)
        assert stats["all"][score] == s
        with Image.open(os.path.join(reference, f"hist_{score}.png")) as img:
            assert np.asarray(img.convert("L")).std() > 5
    page = open(os.path.join(reference, "summary.html")).read()
    assert "src='http" not in page and page.count("src='data:image/png;base64,") == 2 + 4 * 3  # histograms + 12 pairs
    best = max(rows, key=lambda r: float(r["imacs_g"]))["pair_id"]
    worst = min(rows, key=lambda r: float(r["imacs_r"]))["pair_id"]
    assert best in page and worst in page


def test_compact_and_full_maps(viton, tmp_path):
    out = str(tmp_path / "full")
    assert main(["evaluate-dataset", "--data", viton, *RUN, "--out", out, "--limit", "2", "--full-maps"]) == 0
    for row in json.loads("[" + ",".join(open(os.path.join(out, "results.jsonl"))) + "]"):
        folder = os.path.join(out, os.path.dirname(row["files"][0]))
        full = i2am_fast.AttributionMaps.load(os.path.join(folder, "maps_full.safetensors"))
        compact = read_compact(os.path.join(folder, "maps.safetensors"))
        for kind in ("generated", "reference"):
            read = getattr(full, kind)
            expected = {"": read(normalize=False),
                        "_time_groups": torch.stack([read(time_group=t, normalize=False) for t in range(full.time_groups)]),
                        "_heads": torch.stack([read(head=h, normalize=False) for h in range(4)])}
            for suffix, value in expected.items():
                got = compact[kind + suffix]
                assert got.shape == value.shape
                peak = value.flatten(-2).amax(-1)[..., None, None] if value.dim() == 3 else value.max()
                assert ((got - value).abs() <= 1e-3 * peak).all(), kind + suffix
        pair = next(p for p in read_pairs(viton, "viton-hd") if p.id == row["pair_id"])
        x = load_pair(pair, (64, 48), seed=row["seed"])
        assert torch.equal(compact["inpaint_mask"], x.inpaint_mask) and torch.equal(compact["garment_mask"], x.garment_mask)
        scores = i2am_fast.imacs(full.generated(), x.inpaint_mask, reference_map=full.reference(), reference_mask=x.garment_mask)
        assert scores["imacs_g"] == pytest.approx(row["imacs_g"], abs=1e-12)
        assert scores["imacs_r"] == pytest.approx(row["imacs_r"], abs=1e-12)


def test_python_entry_with_a_custom_render_function(viton, tmp_path):
    from i2am_fast.demo.model import build_demo_model

    calls = []

    def build(device):
        model = build_demo_model().to(device)

        def render(inputs, tracer):
            calls.append((inputs.pair.id, type(tracer).__name__, tuple(inputs.person.shape)))
            images = model(inputs.person[None], inputs.inpaint_mask[None], inputs.body_parts[None], inputs.garment[None],
                           steps=2, seed=inputs.seed)
            return images[0, :, :10, :10] if inputs.pair.id.startswith("00001") else images[0]  # one broken result

        return System(model, render, (64, 48), trace_options={"time_groups": 2})

    summary = evaluate_dataset(build, data=viton, layout="viton-hd", out=str(tmp_path / "py"), limit=3, progress=False)
    assert [c[0] for c in calls] == [p.id for p in read_pairs(viton, "viton-hd")[:3]]
    assert {c[1] for c in calls} == {"Tracer"} and {c[2] for c in calls} == {(3, 64, 48)}
    errors = {r["pair_id"]: r["error"] for r in summary["rows"]}
    assert "render returned a 10x10 image" in errors["00001_00__00001_00"]
    assert sum(e is None for e in errors.values()) == 2
    meta = read_compact(os.path.join(str(tmp_path / "py"), summary["rows"][0]["files"][1]))["meta"]
    assert meta["time_groups"] == 2 and meta["num_steps"] == 2


def test_paint_by_example_pipeline_folder(viton, tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    from systems import paint_by_example

    folder = str(tmp_path / "pbe")
    paint_by_example().target.save_pretrained(folder)
    out = str(tmp_path / "pbe-out")
    assert main(["evaluate-dataset", "--data", viton, "--layout", "viton-hd", "--pipeline", folder, "--steps", "2",
                 *SIZE, "--limit", "2", "--out", out]) == 0
    rows = _rows(out)
    assert len(rows) == 2 and all(r["error"] == "" for r in rows.values())
    meta = read_compact(os.path.join(out, json.loads(open(os.path.join(out, "results.jsonl")).readline())["files"][1]))["meta"]
    assert meta["reference_grid"] == [1, 1] and meta["latent_grid"] == [8, 6]
