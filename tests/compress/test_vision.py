"""Task image-classification on a tiny MBConv CNN (stem 8, five blocks, head 32)
trained here on synthetic 12x12 images of four classes: the student derived from
the teacher, logit KD, the pixel_values export, loaders and their errors, Conv
FLOPs, and an end-to-end `compress build` to a cpu build with retention."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compress.artifact import Artifact, digest_files
from compress.errors import RecipeError, SourceError
from compress.recipe import DistillConfig, ExportConfig, QuantizeConfig, StudentConfig
from tests.stage_helpers import context

CLASSES = ["bar", "column", "corner", "ring"]
SHAPE = [1, 12, 12]


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, 12, 12]: a horizontal bar, a vertical bar, a corner square or a ring,
    at a random offset, on noise. Separable, but not by one pixel."""
    rng = np.random.RandomState(seed)
    images = rng.randint(0, 90, size=(n, 12, 12)).astype(np.int32)
    labels = rng.randint(0, len(CLASSES), size=n)
    for img, label in zip(images, labels):
        dy, dx = rng.randint(0, 4, size=2)
        if label == 0:
            img[4 + dy:6 + dy, 1:11] += 160
        elif label == 1:
            img[1:11, 4 + dx:6 + dx] += 160
        elif label == 2:
            img[dy:dy + 5, dx:dx + 5] += 160
        else:
            img[2 + dy:8 + dy, 2 + dx:8 + dx] += 160
            img[4 + dy:6 + dy, 4 + dx:6 + dx] -= 160
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


def tiny_config() -> dict:
    from compress.vision import lite0_config

    cfg = lite0_config(in_channels=1, input_size=(12, 12), image_size=16, num_classes=len(CLASSES), labels=CLASSES)
    cfg.update(stem=8, head=32, dropout=0.0, blocks=[
        {"in": 8, "out": 8, "hidden": 8, "expand": False, "kernel": 3, "stride": 1},
        {"in": 8, "out": 12, "hidden": 24, "expand": True, "kernel": 3, "stride": 2},
        {"in": 12, "out": 12, "hidden": 24, "expand": True, "kernel": 3, "stride": 1},
        {"in": 12, "out": 16, "hidden": 32, "expand": True, "kernel": 5, "stride": 2},
        {"in": 16, "out": 16, "hidden": 32, "expand": True, "kernel": 3, "stride": 1},
    ])
    return cfg


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def images(n: int, seed: int, labelled: bool = True):
    from compress.vision import Images

    x, y = synthetic(n, seed)
    return Images(x[:, None].astype(np.float32) / 255.0, y if labelled else None, f"synthetic-{seed}")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    import torch

    from compress.vision import build_model, finetune, save_model

    torch.manual_seed(0)
    model = build_model(tiny_config())
    finetune(model, images(600, seed=0), {"epochs": 4, "batch_size": 32, "lr": 1e-2, "seed": 0, "warmup": 0.05})
    d = tmp_path_factory.mktemp("tiny-cnn")
    save_model(model, d)
    return d


def artifact(path: Path) -> Artifact:
    from compress.vision import io_meta, read_config

    return Artifact(path=path, kind="torch", digest=digest_files(path),
                    meta={"task": "image-classification", **io_meta(read_config(path))})


def image_context(out: Path, train, validation=None, calibration=None):
    from compress.vision import StageImages

    ctx = context(out, [])
    ctx.images = StageImages(train, validation if validation is not None else train[:16],
                             calibration if calibration is not None else train[:64])
    return ctx


def test_teacher_has_real_accuracy(teacher_dir):
    from compress.classify import accuracy
    from compress.vision import TorchImageClassifier

    test = images(300, seed=9)
    assert accuracy(TorchImageClassifier(teacher_dir).logits(test.pixels), test.labels) > 0.9


def test_derived_student_keeps_blocks_and_the_strongest_channels(teacher_dir):
    import torch

    from compress.vision import default_blocks, derive_student, load_model

    teacher = load_model(teacher_dir)
    assert default_blocks(teacher.config) == [1, 2, 3]  # residual blocks 0, 2, 4: every other (0 and 4) dropped
    student = derive_student(teacher, [0, 1, 3], channels=0.5)
    assert [b["hidden"] for b in student.config["blocks"]] == [8, 12, 16]  # block 0 has no expansion to narrow
    assert student.config["head"] == 16 and student.config["teacher_blocks"] == [0, 1, 3]
    # weights come from the teacher: the kept expand rows are a subset of the teacher's, in order
    t_rows = teacher._blocks[3]._expand_conv.weight.flatten(1)
    s_rows = student._blocks[2]._expand_conv.weight.flatten(1)
    picked = [int(torch.where((t_rows == r).all(1))[0][0]) for r in s_rows]
    assert picked == sorted(picked) and len(set(picked)) == 16
    assert torch.equal(student._conv_stem.weight, teacher._conv_stem.weight)
    out = student(torch.rand(3, *SHAPE))
    assert out.shape == (3, len(CLASSES))
    with pytest.raises(RecipeError, match="block 1 changes shape"):
        derive_student(teacher, [0, 2, 3], channels=0.5)


def test_default_blocks_drop_every_other_residual_block():
    from compress.vision import default_blocks, lite0_config

    cfg = lite0_config()
    assert default_blocks(cfg) == [0, 1, 3, 4, 5, 7, 8, 10, 11, 13, 15]


@pytest.fixture(scope="module")
def distilled(teacher_dir, tmp_path_factory):
    from compress.vision import distill

    train = images(480, seed=1, labelled=False)  # unlabelled: the teacher's logits are the only signal
    cfg = DistillConfig(student=StudentConfig(layers=[1, 3], channels=0.5), losses=["logit"], epochs=4,
                        batch_size=32, lr=5e-3)
    return distill(artifact(teacher_dir), cfg, image_context(tmp_path_factory.mktemp("distill"), train))


def test_logit_distillation_learns_the_teacher(distilled, teacher_dir):
    from compress.classify import fidelity
    from compress.vision import TorchImageClassifier, derive_student, load_model

    meta = distilled.meta
    assert meta["num_layers"] == 2 and meta["labelled_inputs"] == 0
    assert meta["params"] < meta["teacher_params"]
    assert meta["logit_loss_last"] < 0.5 * meta["logit_loss_first"]
    held = images(300, seed=7)
    t = TorchImageClassifier(teacher_dir).logits(held.pixels)
    raw = derive_student(load_model(teacher_dir), [1, 3], channels=0.5)
    import torch

    with torch.inference_mode():
        undistilled = raw(torch.from_numpy(held.pixels)).numpy()
    s = TorchImageClassifier(distilled.path).logits(held.pixels)
    assert fidelity(s, t)["agreement"] > fidelity(undistilled, t)["agreement"] + 0.1
    assert fidelity(s, t)["agreement"] > 0.85


def test_feature_distillation_alone_pulls_block_outputs_to_the_teacher(teacher_dir, tmp_path):
    from compress.vision import distill

    cfg = DistillConfig(student=StudentConfig(layers=[1, 3], channels=0.5), losses=["feature"], epochs=3,
                        batch_size=32, lr=5e-3)
    art = distill(artifact(teacher_dir), cfg, image_context(tmp_path, images(160, seed=4, labelled=False)))
    assert "logit_loss_first" not in art.meta  # no logit term was trained
    assert art.meta["loss_last"] < 0.7 * art.meta["loss_first"]


def test_export_and_static_int8_match_torch(distilled, tmp_path):
    import onnx

    from compress.graphstats import matmul_flops
    from compress.quantize import quantize
    from compress.vision import export

    ctx = image_context(tmp_path / "export", images(200, seed=3))
    art = export(distilled, ExportConfig(), ctx)
    model = onnx.load(str(art.model_file))
    assert [i.name for i in model.graph.input] == ["pixel_values"]
    assert art.meta["outputs"] == {"logits": ["batch", len(CLASSES)]}
    assert art.meta["validation"]["images"]["max_abs_diff"] < 1e-3
    ops = {n.op_type for n in model.graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops  # folded into the convs
    # Conv FLOPs, counted by hand for the stem: 8 outputs x 8x8 positions x 1 channel x 3x3, at 16x16
    flops = matmul_flops(art.model_file)
    stem = 2 * 8 * 8 * 8 * 1 * 9
    assert flops["uncounted"] == 0 and flops["float"] > stem and flops["int8"] == 0

    q = quantize(art, QuantizeConfig(mode="static", calibration="minmax"), image_context(tmp_path / "q", images(200, seed=3)))
    qops = [n.op_type for n in onnx.load(str(q.model_file)).graph.node]
    assert qops.count("QuantizeLinear") > 0
    assert q.meta["quantization"]["flops"]["int8_share"] > 0.9  # every Conv and the Gemm run in int8
    assert q.meta["quantization"]["agreement_random"]["mean_cosine"] > 0.95
    assert q.meta["precision"] == "int8" and q.meta["quantization"]["weights"].startswith("s7")


def test_npz_loader_and_its_errors(tmp_path):
    from compress.vision import load_images

    x, y = synthetic(10, seed=0)
    np.savez(tmp_path / "ok.npz", images=x, labels=y)
    got = load_images(str(tmp_path / "ok.npz"), 6, "data.train", SHAPE, 4, need_labels=True)
    assert got.pixels.shape == (6, 1, 12, 12) and got.pixels.max() <= 1.0 and list(got.labels) == list(y[:6])
    np.savez(tmp_path / "rgb.npz", images=np.zeros((3, 12, 12, 3), np.uint8), labels=np.zeros(3, np.int64))
    assert load_images(str(tmp_path / "rgb.npz"), None, "d", [3, 12, 12], 4, True).pixels.shape == (3, 3, 12, 12)
    np.savez(tmp_path / "nolabels.npz", images=x)
    np.savez(tmp_path / "badlabels.npz", images=x, labels=y + 10)
    np.savez(tmp_path / "noimages.npz", pixels=x)
    cases = [("missing.npz", "data.eval[0]: ", "does not exist"),
             ("nolabels.npz", "data.eval[0]: ", "has no labels; save them as labels="),
             ("badlabels.npz", "data.eval[0]: ", "the teacher has 4 classes"),
             ("noimages.npz", "data.eval[0]: ", "no 'images'"),
             ("rgb.npz", "data.eval[0]: ", "the teacher takes [1, 12, 12]")]
    for name, start, fragment in cases:
        with pytest.raises(SourceError) as exc:
            load_images(str(tmp_path / name), None, "data.eval[0]", SHAPE, 4, need_labels=True)
        msg = str(exc.value)
        assert msg.startswith(start) and fragment in msg and "\n" not in msg


def test_fashion_mnist_missing_names_the_debian_package(tmp_path, monkeypatch):
    from compress import vision

    monkeypatch.setattr(vision, "FASHION_DIR", tmp_path)
    with pytest.raises(SourceError) as exc:
        vision.load_images("example:fashion-mnist-test", 10, "data.eval[0]", [1, 28, 28], 10, True)
    msg = str(exc.value)
    assert "\n" not in msg and "apt-get install dataset-fashion-mnist" in msg and msg.startswith("data.eval[0]:")


def test_fashion_mnist_idx_files_are_read(tmp_path, monkeypatch):
    import gzip

    from compress import vision

    x, y = synthetic(5, seed=1)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (5, 12, 12)) + x.tobytes())
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + y.astype(np.uint8).tobytes())
    monkeypatch.setattr(vision, "FASHION_DIR", tmp_path)
    got = vision.load_images("example:fashion-mnist-test", None, "data.eval[0]", SHAPE, 10, True)
    assert np.array_equal(got.pixels[:, 0], x / np.float32(255)) and list(got.labels) == list(y)
    assert got.name == "fashion-mnist-test"


IMAGE_RECIPE = {"task": "image-classification", "teacher": {"source": "example:efficientnet-lite0-fashion"},
                "data": {"train": {"source": "example:fashion-mnist-train"},
                         "eval": [{"source": "example:fashion-mnist-test"}]}}


@pytest.mark.parametrize("change, message", [
    ({"teacher": {"source": "example:minilm"}}, "teacher.source: task image-classification needs"),
    ({"data": {"train": {"source": "example:corpus"}, "eval": [{"source": "example:fashion-mnist-test"}]}},
     "data.train: task image-classification reads images"),
    ({"data": {"train": {"source": "example:fashion-mnist-train"}, "eval": []}}, "data.eval: task image-classification needs"),
    ({"stages": [{"distill": {}}, {"prune": {}}]}, "stages.prune: not supported for task image-classification"),
    ({"stages": [{"distill": {"losses": ["attention"]}}]}, "stages.distill.losses: attention needs self-attention"),
    ({"stages": [{"distill": {"student": {"ffn": 0.2}}}]}, "stages.distill.student: heads and ffn narrow transformers"),
    ({"stages": [{"quantize": {"dtype": "fp16"}}]}, "stages.quantize.dtype: fp16 is not supported"),
    ({"stages": [{"quantize": {"mode": "qat"}}]}, "stages.quantize: qat is not supported"),
    ({"stages": [{"quantize": {"fallback": {"enabled": True}}}]}, "stages.quantize.fallback:"),
])
def test_recipe_errors(change, message):
    from compress.recipe import parse

    with pytest.raises(RecipeError) as exc:
        parse({**IMAGE_RECIPE, **change})
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


def test_recipe_errors_for_images_under_a_text_task():
    from compress.recipe import parse

    recipe = parse(IMAGE_RECIPE)  # the example recipe's shape is valid
    # ...and re-reads from a report, where every field is spelled out (compress bench does this)
    parse(recipe.model_dump(mode="json", exclude_none=True))
    with pytest.raises(RecipeError, match="set task: image-classification"):
        parse({"teacher": {"source": "example:efficientnet-lite0-fashion"}})
    with pytest.raises(RecipeError, match="data.train: example:fashion-mnist-train holds images"):
        parse({"data": {"train": {"source": "example:fashion-mnist-train"}}})
    with pytest.raises(RecipeError, match="student.channels: narrows CNN blocks"):
        parse({"stages": [{"distill": {"student": {"channels": 0.3}}}]})


def test_teacher_directory_errors(tmp_path):
    from compress.vision import check_teacher

    with pytest.raises(SourceError, match="does not exist or is not a directory"):
        check_teacher(str(tmp_path / "nope"))
    with pytest.raises(SourceError, match="not an image model directory"):
        check_teacher(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(SourceError, match="names architecture 'resnet'"):
        check_teacher(str(tmp_path))


@pytest.fixture(scope="module")
def project(teacher_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("image-project")
    x, y = synthetic(600, seed=11)
    np.savez(d / "train.npz", images=x, labels=y)
    x, y = synthetic(200, seed=12)
    np.savez(d / "test.npz", images=x, labels=y)
    (d / "compress.yaml").write_text(f"""
teacher: {{source: "{teacher_dir}"}}
task: image-classification
data:
  train: {{source: train.npz}}
  heldout_fraction: 0.1
  eval: [{{source: test.npz}}]
stages:
  - distill: {{student: {{layers: [1, 3], channels: 0.5}}, losses: [logit, feature], epochs: 3, batch_size: 32, lr: 5.0e-3}}
  - quantize: {{mode: auto, calibration: minmax}}
targets: {{cpu: {{}}}}
bench: {{runs: 4, rounds: 2, warmup: 1, rss: false}}
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    res = subprocess.run([sys.executable, "-m", "compress", "build", "-r", "compress.yaml", "--target", "cpu"], cwd=d,
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr
    return d


def test_build_reports_accuracy_retention_params_and_flops(project):
    rep = json.loads((project / "build" / "cpu" / "report.json").read_text())
    assert rep["task"] == "image-classification"
    assert [s["stage"] for s in rep["stages"]] == ["distill", "export", "quantize", "target cpu"]
    teacher_acc = rep["teacher"]["metrics"]["test"]
    assert teacher_acc > 0.85 and round(teacher_acc * 200) == pytest.approx(teacher_acc * 200)
    for s in rep["stages"]:
        q = s["quality"]
        assert q["retention"]["test"] == pytest.approx(q["metrics"]["test"] / teacher_acc)
        assert set(q["fidelity"]) == {"cosine", "agreement", "kl"}
    assert rep["stages"][1]["meta"]["inputs"] == {"pixel_values": ["batch", 1, 12, 12]}
    assert rep["stages"][-1]["meta"]["precision"] == "int8"
    # mode auto built, scored and timed both post-training modes on the target
    decision = rep["stages"][2]["decision"]
    assert set(decision["candidates"]) == {"dynamic", "static"} and decision["chosen"] in ("dynamic", "static")
    assert all(c["p50_ms"] > 0 for c in decision["candidates"].values())
    assert rep["stages"][-1]["meta"]["graph"]["int8_kernels"] > 0  # QLinearConv / ConvInteger after ORT's optimizations
    assert rep["summary"]["retention"]["test"] > 0.85
    compute = rep["summary"]["compute"]
    assert compute["at"]["input"] == [1, 1, 12, 12]
    assert 0 < compute["student"]["flops"] < compute["teacher"]["flops"]
    assert 0 < compute["student"]["params"] < compute["teacher"]["params"]
    assert {"student", "teacher-torch-fp32", "teacher-ort-fp32", "teacher-ort-int8"} <= set(rep["bench"]["models"])
    assert rep["bench"]["conditions"]["image_shape"] == [1, 12, 12]
    md = (project / "build" / "cpu" / "report.md").read_text()
    assert "| test |" in md or "test (1.000)" in md


def test_bench_of_a_finished_image_build_feeds_images_to_every_model(project, monkeypatch):
    from compress.pipeline import bench_build_dir

    monkeypatch.chdir(project)  # the recipe's data paths are relative, as `compress bench` runs them
    result = bench_build_dir(project / "build" / "cpu", project / ".compress" / "cache", runs=4, teacher=True, rss=True)
    assert result["conditions"]["image_shape"] == [1, 12, 12]
    # peak RSS is measured in a child process, which must get image inputs too
    assert all(m["peak_rss_bytes"] > 0 for m in result["models"].values())
    assert set(result["models"]) == {"student", "teacher-torch-fp32", "teacher-ort-fp32", "teacher-ort-int8"}
    prov = json.loads((project / "build" / "cpu" / "provenance.json").read_text())
    assert prov["data"]["packages"] == {} and prov["teacher"]["package"] is None  # user files, not example data


def test_nproc_2_distils_an_image_student_like_one_process(project):
    """`--nproc 2` with batch_size 16 against the project's one-process build
    with batch_size 32 (the same global batch), 3 epochs: every image once per
    epoch, on one rank; the same steps; the same accuracy retention. BatchNorm
    statistics are per rank (16 images each), so the two runs differ a little."""
    recipe = (project / "compress.yaml").read_text()
    assert "epochs: 3, batch_size: 32" in recipe and "quantize: {mode: auto, calibration: minmax}" in recipe
    # dynamic int8 instead of auto (which times both modes): the distill and export stages are compared
    (project / "two.yaml").write_text(recipe.replace("batch_size: 32", "batch_size: 16").replace(
        "quantize: {mode: auto, calibration: minmax}", "quantize: {mode: dynamic}"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    res = subprocess.run([sys.executable, "-m", "compress", "build", "--nproc", "2", "-r", "two.yaml", "--target", "cpu",
                          "-o", "b2", "--cache", "c2", "--no-bench"], cwd=project, capture_output=True, text=True,
                         timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 processes" in res.stderr
    one = json.loads((project / "build" / "cpu" / "report.json").read_text())
    two = json.loads((project / "b2" / "cpu" / "report.json").read_text())
    m1, m2 = one["stages"][0]["meta"], two["stages"][0]["meta"]
    d1, d2 = m1["data"], m2["data"]
    assert (d1["ranks"], d2["ranks"]) == (1, 2) and d1["inputs"] == d2["inputs"] == m2["train_inputs"] == 540
    assert m2["steps"] == m1["steps"] == 3 * 17
    for data in (d1, d2):
        assert len(data["epochs"]) == 3
        for epoch in data["epochs"]:  # every image once per epoch, on one of the ranks
            assert epoch["seen"] == epoch["distinct"] == data["inputs"]
    for epoch in d2["epochs"]:
        assert abs(epoch["per_rank"][0] - epoch["per_rank"][1]) <= 16  # within one batch's share
    # it learned as much as one process (rank 0's loss is on its half of each batch)
    assert m2["loss_last"] < 0.5 * m2["loss_first"]
    assert m2["loss_last"] == pytest.approx(m1["loss_last"], rel=0.35)
    for q1, q2 in zip([s["quality"] for s in one["stages"][:2]], [s["quality"] for s in two["stages"][:2]]):
        assert q2["retention"]["test"] == pytest.approx(q1["retention"]["test"], abs=0.05)
        assert q2["fidelity"]["agreement"] == pytest.approx(q1["fidelity"]["agreement"], abs=0.05)
        assert q2["fidelity"]["cosine"] == pytest.approx(q1["fidelity"]["cosine"], abs=0.01)
    assert two["summary"]["retention"]["test"] > 0.85
