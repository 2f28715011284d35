"""Task image-classification with a Hugging Face teacher (hf:<dir>): droppable blocks
found by a probe forward on ResNet, ViT and MobileNetV2 configs built here, the
student saved and reloaded, the one-line errors, and one end-to-end `compress
build` of a tiny ResNet (3-channel, 16x16) trained here on gray 12x12 images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from compress.errors import RecipeError, SourceError
from tests.compress.test_vision import CLASSES, images, synthetic

PREPROCESSOR = {"do_resize": True, "size": {"height": 16, "width": 16}, "do_normalize": True,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "rescale_factor": 1 / 255}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def resnet(depths=(2, 3)):
    import torch
    from transformers import AutoModelForImageClassification, ResNetConfig

    torch.manual_seed(0)
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=list(depths), layer_type="basic",
                       num_labels=len(CLASSES), id2label=dict(enumerate(CLASSES)),
                       label2id={c: i for i, c in enumerate(CLASSES)})
    return AutoModelForImageClassification.from_config(cfg).eval()


def save(model, d: Path, preprocessor: dict | None = PREPROCESSOR) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d)
    if preprocessor is not None:
        (d / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return d


def test_droppable_blocks_are_found_by_a_probe_on_resnet_vit_and_mobilenet(tmp_path):
    import torch
    from transformers import AutoModelForImageClassification, MobileNetV2Config, ViTConfig

    from compress import hf_vision

    x = torch.rand(2, 1, 12, 12)
    # ResNet: stage 0 keeps width and stride (every layer has a skip); stage 1's first layer
    # widens and strides. The convolutions inside a layer keep shape too but have no skip.
    teacher = hf_vision.load_model(save(resnet(), tmp_path / "resnet"))
    assert teacher.prep["size"] == [16, 16] and teacher.prep["mean"] == pytest.approx([0.5] * 3)
    blocks = hf_vision.find_blocks(teacher.model, teacher.inputs(x))
    assert [(b.name, b.droppable) for b in blocks] == [
        ("resnet.encoder.stages.0.layers.0", True), ("resnet.encoder.stages.0.layers.1", True),
        ("resnet.encoder.stages.1.layers.0", False), ("resnet.encoder.stages.1.layers.1", True),
        ("resnet.encoder.stages.1.layers.2", True)]
    keep = hf_vision.default_blocks(blocks)
    assert keep == [0, 2, 4]  # each stage's first block and every other one after it
    student, plan = hf_vision.derive_student(teacher, blocks, keep)
    assert plan["config_updated"] == {"depths": [[2, 3], [1, 2]]}
    assert hf_vision.count_params(student) < hf_vision.count_params(teacher)
    with torch.no_grad():
        assert student(x).shape == (2, len(CLASSES))
    with pytest.raises(RecipeError) as exc:
        hf_vision.derive_student(teacher, blocks, [0, 1, 3, 4])
    assert str(exc.value) == ("stages.distill.student.layers: block 2 (resnet.encoder.stages.1.layers.0) changes "
                              "shape or has no skip connection and must be kept; droppable blocks are [0, 1, 3, 4]")

    # ViT: every encoder layer is a residual block; its count is config.num_hidden_layers
    torch.manual_seed(0)
    vit = AutoModelForImageClassification.from_config(ViTConfig(
        image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=32, num_labels=len(CLASSES))).eval()
    teacher = hf_vision.load_model(save(vit, tmp_path / "vit", preprocessor=None))
    assert teacher.prep["size"] == [16, 16]  # config.image_size, without a preprocessor config
    blocks = hf_vision.find_blocks(teacher.model, teacher.inputs(x))
    assert len(blocks) == 4 and all(b.droppable for b in blocks) and len({b.container for b in blocks}) == 1
    student, plan = hf_vision.derive_student(teacher, blocks, [0, 3])
    assert plan["config_updated"] == {"num_hidden_layers": [4, 2]}
    hf_vision.save_model(student, plan, tmp_path / "vit-student", tmp_path / "vit")
    # the saved student is a plain transformers directory too: from_pretrained alone reloads it
    plain = AutoModelForImageClassification.from_pretrained(tmp_path / "vit-student").eval()
    with torch.no_grad():
        want = student(x)
        assert torch.allclose(plain(pixel_values=student.inputs(x)).logits, want, atol=1e-6)
        assert torch.allclose(hf_vision.load_model(tmp_path / "vit-student")(x), want, atol=1e-6)

    # MobileNetV2: one flat list of inverted residuals; no config field counts them, so
    # the student reloads through its blocks.json
    torch.manual_seed(0)
    mnv2 = AutoModelForImageClassification.from_config(MobileNetV2Config(
        image_size=16, depth_multiplier=0.25, num_labels=len(CLASSES))).eval()
    teacher = hf_vision.load_model(save(mnv2, tmp_path / "mnv2", preprocessor=None))
    blocks = hf_vision.find_blocks(teacher.model, teacher.inputs(x))
    droppable = [b.index for b in blocks if b.droppable]
    assert len(blocks) == 16 and droppable == [1, 3, 4, 6, 7, 8, 10, 11, 13, 14]
    keep = hf_vision.default_blocks(blocks)
    student, plan = hf_vision.derive_student(teacher, blocks, keep)
    assert plan["config_updated"] == {} and len(student.model.mobilenet_v2.layer) == len(keep) < 16
    hf_vision.save_model(student, plan, tmp_path / "mnv2-student", tmp_path / "mnv2")
    with torch.no_grad():
        assert torch.allclose(hf_vision.load_model(tmp_path / "mnv2-student")(x), student(x), atol=1e-6)


def test_teacher_errors_are_one_line(tmp_path):
    from transformers import BertConfig, ResNetConfig, ResNetModel

    from compress.recipe import parse
    from compress.vision import check_teacher, load_inputs

    def error(source: str) -> str:
        with pytest.raises(SourceError) as exc:
            check_teacher(source)
        assert "\n" not in str(exc.value)
        return str(exc.value)

    bert = tmp_path / "bert"
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(bert)
    (bert / "model.safetensors").write_bytes(b"")
    assert error(f"hf:{bert}").startswith(f"teacher.source: {bert} is a bert model, which has no image-classification")
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, "architectures": ["BertForSequenceClassification"]}))
    assert "holds a BertForSequenceClassification, not an image classifier" in error(f"hf:{bert}")
    base = save(ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])), tmp_path / "base")
    assert "holds a ResNetModel, not an image classifier" in error(f"hf:{base}")
    d = save(resnet(), tmp_path / "resnet")
    assert error(str(d)) == f"teacher.source: {d} is a Hugging Face model directory (model_type resnet); set teacher.source: hf:{d}"

    with pytest.raises(RecipeError, match="student.channels: narrows MBConv blocks only"):
        parse({"task": "image-classification", "teacher": {"source": f"hf:{d}"},
               "data": {"train": {"source": "t.npz"}, "eval": [{"source": "e.npz"}]},
               "stages": [{"distill": {"student": {"channels": 0.3}}}]})

    def inputs(train: dict, test: dict) -> str:
        np.savez(tmp_path / "train.npz", **train)
        np.savez(tmp_path / "test.npz", **test)
        recipe = parse({"task": "image-classification", "teacher": {"source": f"hf:{d}"},
                        "data": {"train": {"source": str(tmp_path / "train.npz")},
                                 "eval": [{"source": str(tmp_path / "test.npz")}]}})
        with pytest.raises(SourceError) as exc:
            load_inputs(recipe)
        assert "\n" not in str(exc.value)
        return str(exc.value)

    x, y = synthetic(40, seed=0)
    # the eval set names its classes; the teacher's id2label has them in another order
    msg = inputs({"images": x}, {"images": x, "labels": y, "classes": np.array(CLASSES[::-1])})
    assert msg.startswith("data.eval[0]: ") and "has 4 classes, the teacher 4 (config id2label), first " \
                                                 "difference at id 0: 'ring' vs 'bar'" in msg
    # gray images feed a 3-channel teacher; 2 channels do not
    msg = inputs({"images": np.zeros((40, 12, 12, 2), np.uint8)}, {"images": x, "labels": y})
    assert msg.startswith("data.train: ") and "has 2-channel images, the teacher takes 3" in msg
    # every source must have the train images' shape, the build's input
    msg = inputs({"images": x}, {"images": np.zeros((4, 14, 14), np.uint8), "labels": y[:4]})
    assert "data.train has [1, 12, 12] (the build's input)" in msg


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A ResNet teacher fine-tuned here (a few seconds) and a project that builds it."""
    from compress import hf_vision
    from compress.vision import finetune

    d = tmp_path_factory.mktemp("hf-image-project")
    teacher_dir = save(resnet(), d / "teacher")
    wrapped = hf_vision.load_model(teacher_dir)
    finetune(wrapped, images(400, seed=0), {"epochs": 3, "batch_size": 32, "lr": 1e-2, "seed": 0, "warmup": 0.05})
    wrapped.model.save_pretrained(teacher_dir)
    x, y = synthetic(400, seed=11)
    np.savez(d / "train.npz", images=x, labels=y)
    x, y = synthetic(200, seed=12)
    np.savez(d / "test.npz", images=x, labels=y, classes=np.array(CLASSES))
    (d / "compress.yaml").write_text(f"""
teacher: {{source: "hf:{teacher_dir}"}}
task: image-classification
data:
  train: {{source: train.npz}}
  heldout_fraction: 0.1
  eval: [{{source: test.npz}}]
stages:
  - distill: {{losses: [logit, feature], epochs: 3, batch_size: 32, lr: 5.0e-3}}
  - quantize: {{mode: static, calibration: minmax}}
targets: {{cpu: {{}}}}
bench: {{runs: 4, rounds: 2, warmup: 1, rss: false, threads: 1}}
""")
    return d


def test_build_of_a_hugging_face_resnet(project, monkeypatch):
    import onnx
    from transformers import AutoModelForImageClassification

    from compress.cli import main

    monkeypatch.chdir(project)
    assert main(["build", "-r", "compress.yaml", "--target", "cpu"]) == 0
    out = project / "build" / "cpu"
    rep = json.loads((out / "report.json").read_text())
    assert [s["stage"] for s in rep["stages"]] == ["distill", "export", "quantize", "target cpu"]
    distilled = rep["stages"][0]
    meta = distilled["meta"]
    # default student.layers: each stage's first block and every other one after it
    assert meta["layers"] == [0, 2, 4] and meta["structure"]["blocks_dropped"] == [1, 3]
    assert meta["structure"]["blocks"][2] == "resnet.encoder.stages.1.layers.0"
    assert meta["params"] < meta["teacher_params"]
    assert meta["logit_loss_last"] < meta["logit_loss_first"]
    student = AutoModelForImageClassification.from_pretrained(distilled["path"])
    assert student.config.depths == [1, 2] and [len(s.layers) for s in student.resnet.encoder.stages] == [1, 2]
    # gray 12x12 pixels in; resize to 16x16, three channels and normalisation are in the graph
    export = rep["stages"][1]["meta"]
    assert export["inputs"] == {"pixel_values": ["batch", 1, 12, 12]}
    assert export["validation"]["images"]["max_abs_diff"] < 1e-3
    model = onnx.load(str(out / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["pixel_values"]
    assert rep["stages"][-1]["meta"]["precision"] == "int8"
    assert rep["stages"][-1]["meta"]["graph"]["int8_kernels"] > 0
    teacher_acc = rep["teacher"]["metrics"]["test"]
    assert teacher_acc > 0.8
    for s in rep["stages"]:
        q = s["quality"]
        assert q["retention"]["test"] == pytest.approx(q["metrics"]["test"] / teacher_acc)
    assert rep["summary"]["retention"]["test"] > 0.7
    compute = rep["summary"]["compute"]
    assert 0 < compute["student"]["flops"] < compute["teacher"]["flops"]
    assert {"student", "teacher-torch-fp32", "teacher-ort-fp32", "teacher-ort-int8"} <= set(rep["bench"]["models"])
    assert rep["bench"]["conditions"]["image_shape"] == [1, 12, 12]
