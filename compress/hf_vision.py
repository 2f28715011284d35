"""Task image-classification with a Hugging Face teacher (`teacher.source: hf:<dir>`):
any AutoModelForImageClassification directory (ResNet, ConvNeXt, MobileNetV2,
EfficientNet, ViT, ...), without code per family.

vision.py hands over here for the parts that depend on the model: reading the
directory and its preprocessing, the model wrapped to take raw pixels in [0, 1],
finding the blocks a student may drop (a probe forward with hooks), deriving
and saving the student, and its distill stage. Data, training loop, export,
quantization and scoring stay in vision.py, shared with the MBConv models.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from compress.artifact import Artifact, digest_files, seal
from compress.errors import RecipeError, SourceError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
STUDENT_WEIGHTS = "model.safetensors"
PLAN_FILE = "blocks.json"  # the blocks a student kept, re-applied at load when its config cannot say so
# Config fields that count the blocks of the containers, updated in a student's config
# when a model built from the updated config has exactly the student's tensors.
COUNT_FIELDS = ("num_hidden_layers", "depths")
# What transformers' image processors default to when a directory has no preprocessor_config.json.
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
DEFAULT_SIZE = 224


# -- the directory -----------------------------------------------------------------

def is_model_dir(path: Path) -> bool:
    """A Hugging Face model directory (its config.json names a model_type), not an MBConv one."""
    try:
        config = json.loads((Path(path) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config


def read_config(path: Path, where: str = "teacher.source") -> dict:
    cfg_file = Path(path) / CONFIG_FILE
    if not cfg_file.is_file():
        raise SourceError(f"{where}: {path} is not a Hugging Face model directory (no {CONFIG_FILE}); save the "
                          "model with save_pretrained()")
    try:
        config = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise SourceError(f"{where}: {cfg_file} is not valid JSON ({exc}); fix the file") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise SourceError(f"{where}: {cfg_file} has no model_type; save the model with save_pretrained()")
    return config


def check_dir(path: Path, where: str = "teacher.source") -> Path:
    """An AutoModelForImageClassification directory, checked without loading its weights:
    config, weights, and an architecture with a trained image-classification head.
    By the architecture's name when config.json has one (preflight stays light; the
    class mapping would import torch), by transformers' mapping when it has not."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise SourceError(f"{where}: {path} does not exist or is not a directory; give hf:<dir> of an "
                          "AutoModelForImageClassification saved with save_pretrained()")
    config = read_config(path, where)
    if not any((path / w).is_file() for w in WEIGHT_FILES):
        raise SourceError(f"{where}: {path} has no weights ({' or '.join(WEIGHT_FILES)}); save them with save_pretrained()")
    model_type = config["model_type"]
    arch = (config.get("architectures") or [None])[0]
    if arch is None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as CLASSES

        if model_type not in CLASSES:
            raise SourceError(f"{where}: {path} is a {model_type} model, which has no image-classification class in "
                              "transformers; task image-classification needs an AutoModelForImageClassification "
                              "(ResNet, ConvNeXt, MobileNetV2, EfficientNet, ViT, ...)")
    elif "ForImageClassification" not in arch:
        raise SourceError(f"{where}: {path} holds a {arch}, not an image classifier (a new head would be untrained); "
                          f"give an AutoModelForImageClassification directory (fine-tuned on your classes, saved "
                          "with save_pretrained())")
    labels(config)  # id2label readable
    return path


def labels(config: dict) -> list[str]:
    """Class names in id order, from config.id2label (num_labels of LABEL_i when absent)."""
    id2label = config.get("id2label")
    if not id2label:
        return [f"LABEL_{i}" for i in range(int(config.get("num_labels", 2)))]
    try:
        by_id = {int(k): str(v) for k, v in id2label.items()}
    except (AttributeError, ValueError):
        raise SourceError(f"teacher.source: config.json id2label must map class ids to names, got "
                          f"{str(id2label)[:60]}; fix the config") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise SourceError(f"teacher.source: config.json id2label has ids {sorted(by_id)[:8]}, expected 0..{len(by_id) - 1}; "
                          "fix the config")
    return [by_id[i] for i in range(len(by_id))]


def preprocessing(path: Path, config: dict) -> dict:
    """How raw pixels in [0, 1] become what the model was trained on, after its image
    processor: the size it resizes to ([h, w], or None to take images as given),
    per-channel mean and std in [0, 1] pixel units, and its input channels.

    The processor's rescale (x 255 x rescale_factor, minus 1 with rescale_offset) is
    folded into mean and std, so the graph is one Sub and one Div. A center crop is
    not applied: the whole image is resized to the crop's size (the data here are
    fixed-size images, not photos framed for a crop)."""
    channels = int(config.get("num_channels", 3))
    file = Path(path) / PREPROCESSOR_FILE
    found = file.is_file()
    p = {}
    if found:
        try:
            p = json.loads(file.read_text())
        except ValueError as exc:
            raise SourceError(f"teacher.source: {file} is not valid JSON ({exc}); fix or delete it") from None
    size = None
    if p.get("do_resize", True):
        spec = p.get("crop_size") if p.get("do_center_crop") and p.get("crop_size") else p.get("size")
        if spec is None:
            spec = config.get("image_size", DEFAULT_SIZE)
        if isinstance(spec, dict):
            if "height" in spec and "width" in spec:
                size = [int(spec["height"]), int(spec["width"])]
            elif "shortest_edge" in spec:
                size = [int(spec["shortest_edge"])] * 2
            else:
                raise SourceError(f"teacher.source: {file} size {spec} has neither height/width nor shortest_edge; "
                                  "fix the size")
        elif isinstance(spec, (list, tuple)):
            size = [int(spec[0]), int(spec[-1])]
        else:
            size = [int(spec)] * 2
    if p.get("do_normalize", True):
        mean = p.get("image_mean", IMAGENET_MEAN)
        std = p.get("image_std", IMAGENET_STD)
    else:
        mean, std = 0.0, 1.0
    mean = [float(mean)] * channels if isinstance(mean, (int, float)) else [float(m) for m in mean]
    std = [float(std)] * channels if isinstance(std, (int, float)) else [float(s) for s in std]
    if len(mean) != channels or len(std) != channels:
        raise SourceError(f"teacher.source: {file} has image_mean/image_std for {len(mean)}/{len(std)} channels, the "
                          f"model takes {channels} (config.num_channels); fix the preprocessor config")
    if any(s <= 0 for s in std):
        raise SourceError(f"teacher.source: {file} image_std {std} has a value <= 0; fix the preprocessor config")
    scale = 255.0 * float(p.get("rescale_factor", 1 / 255)) if p.get("do_rescale", True) else 255.0
    offset = -1.0 if p.get("do_rescale", True) and p.get("rescale_offset") else 0.0
    # model input = (x * scale + offset - mean) / std = (x - (mean - offset) / scale) / (std / scale)
    return {"size": size, "channels": channels, "mean": [(m - offset) / scale for m in mean],
            "std": [s / scale for s in std], "from": PREPROCESSOR_FILE if found else
            f"defaults (no {PREPROCESSOR_FILE}: ImageNet mean/std, config.image_size or {DEFAULT_SIZE})"}


def teacher_io(path: Path) -> dict:
    """Classes and input channels; the input shape is the data's (see input_shape)."""
    config = read_config(path)
    names = labels(config)
    return {"input_shape": None, "num_labels": len(names), "labels": names,
            "channels": int(config.get("num_channels", 3))}


def input_shape(data_shape: list[int], channels: int, where: str, source: str) -> list[int]:
    """The build's pixel_values shape: the train images' own. The graph resizes them and
    copies one gray channel to the model's channels, so any size of 1 or `channels` channels fits."""
    c = int(data_shape[0])
    if c not in (1, channels):
        raise SourceError(f"{where}: {source} has {c}-channel images, the teacher takes {channels} (config.num_channels) "
                          f"or 1 (copied to {channels}); convert the images")
    return [int(d) for d in data_shape]


def teacher_artifact(source: str, path: Path, shape: list[int] | None) -> Artifact:
    """The directory in place (read only). Its digest covers the input shape too:
    the teacher's ONNX export (the bench reference) takes the data's shape."""
    from compress.sources import license_of

    assert shape is not None, "the input shape comes from data.train: load the data before the teacher"
    config = read_config(path)
    files = sorted(p for p in path.iterdir() if p.is_file())
    digest = hashlib.sha256(f"{digest_files(path, files)} {list(shape)}".encode()).hexdigest()
    names = labels(config)
    meta = {"task": "image-classification", "source": source, "path": str(path), "license": license_of(path),
            "input_shape": list(shape), "num_labels": len(names), "labels": names,
            "architecture": (config.get("architectures") or [config["model_type"]])[0],
            "preprocessing": preprocessing(path, config)}
    return Artifact(path=path, kind="torch", digest=digest, meta=meta)


# -- the model ---------------------------------------------------------------------

def _wrapper():
    import torch
    from torch import nn

    from compress.vision import preprocess

    class HFImageClassifier(nn.Module):
        """A transformers image classifier taking pixel_values in [0, 1]: resizing,
        gray-to-channels and normalisation happen inside, as in the MBConv models, so
        the exported graph takes raw pixels."""

        def __init__(self, model, prep: dict):
            super().__init__()
            self.model = model
            self.prep = prep
            self.register_buffer("mean", torch.tensor(prep["mean"]).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(prep["std"]).view(1, -1, 1, 1), persistent=False)
            self.head_name = classifier_head(model)

        @property
        def num_classes(self) -> int:
            return self.model.get_submodule(self.head_name).out_features

        def inputs(self, pixel_values):
            """What the transformers model gets for pixel_values in [0, 1]."""
            return preprocess(pixel_values, self.prep["size"], self.mean, self.std, self.prep["channels"])

        def forward(self, pixel_values):
            return self.model(pixel_values=self.inputs(pixel_values)).logits

        def encode(self, pixel_values):
            """(logits, [the pooled features the classifier reads]): what feature KD compares."""
            pooled = []
            head = self.model.get_submodule(self.head_name)
            handle = head.register_forward_pre_hook(lambda module, args: pooled.append(args[0]))
            try:
                logits = self.forward(pixel_values)
            finally:
                handle.remove()
            return logits, pooled[-1:]

    return HFImageClassifier


def classifier_head(model) -> str:
    """The name of the last Linear producing the class logits: its input is the pooled
    feature vector in every family (ResNet's flattened pool, ViT's normed CLS token, ...)."""
    from torch import nn

    n = model.config.num_labels
    heads = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == n]
    if not heads:
        raise SourceError(f"teacher.source: no Linear with {n} outputs (config.num_labels) in "
                          f"{type(model).__name__}; give an image classifier with its head")
    return heads[-1]


def load_model(path: Path, where: str = "teacher.source"):
    """The wrapped model of a directory: a teacher through from_pretrained; a student
    (with PLAN_FILE) built from its config, its dropped blocks removed, then its weights."""
    import torch
    from transformers import AutoConfig, AutoModelForImageClassification

    path = Path(path)
    config = read_config(path, where)
    plan_file = path / PLAN_FILE
    if plan_file.is_file():
        from safetensors.torch import load_file

        plan = json.loads(plan_file.read_text())
        model = AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(path))
        apply_plan(model, plan, where)
        try:
            model.load_state_dict(load_file(str(path / STUDENT_WEIGHTS)), strict=True)
        except RuntimeError as exc:
            raise SourceError(f"{where}: the weights in {path} do not fit its {CONFIG_FILE} and {PLAN_FILE}: "
                              f"{str(exc).strip().splitlines()[0]}; save them together with compress.hf_vision.save_model") from None
    else:
        from transformers.utils import logging as hf_logging

        bar_was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a build loads the teacher several times; it shows its own progress
        try:
            model, info = AutoModelForImageClassification.from_pretrained(path, output_loading_info=True,
                                                                          dtype=torch.float32)
        except (OSError, ValueError, RuntimeError) as exc:
            raise SourceError(f"{where}: transformers cannot load {path} as an image classifier: "
                              f"{str(exc).strip().splitlines()[0]}") from None
        finally:
            if bar_was_enabled:
                hf_logging.enable_progress_bar()
        missing = info.get("missing_keys") or []
        if missing:
            raise SourceError(f"{where}: the weights in {path} lack {len(missing)} tensors of "
                              f"{type(model).__name__} (first: {sorted(missing)[0]}); save the whole model with save_pretrained()")
    return _wrapper()(model, preprocessing(path, config)).eval()


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# -- blocks --------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    """One child of a container of blocks: its index over all such blocks (what
    student.layers lists), module name, container and position in it."""

    index: int
    name: str
    container: str
    position: int
    droppable: bool


def _first_tensor(value):
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    if isinstance(value, dict):
        return _first_tensor(list(value.values()))
    if hasattr(value, "to_tuple"):  # a transformers ModelOutput
        return _first_tensor(value.to_tuple())
    return None


def find_blocks(model, pixel_values) -> list[Block]:
    """The blocks of every nn.ModuleList / nn.Sequential of the model, found with one
    probe forward on `pixel_values` (already preprocessed) and hooks on each child.

    A block may be dropped when its output has its input's shape and it returns its
    input when its own weights are zero: a skip connection carries the input around
    everything the block computes. Shape alone would also offer the convolutions
    inside a ResNet block (same shape, no skip). Of nested droppable blocks only the
    innermost count (a ConvNeXt stage of residual layers is one of those layers at a
    time); containers without a droppable block are left out."""
    import torch
    from torch import nn
    from torch.func import functional_call

    containers = [(name, mod) for name, mod in model.named_modules()
                  if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) >= 2]
    calls: dict[str, tuple] = {}
    handles = []

    def watch(name):
        def pre(module, args, kwargs):
            if name not in calls:
                calls[name] = (args, kwargs, None)

        def post(module, args, kwargs, output):
            if name in calls and calls[name][2] is None:
                calls[name] = (calls[name][0], calls[name][1], output)
        return pre, post

    for cname, container in containers:
        for pos, child in enumerate(container):
            pre, post = watch(f"{cname}.{pos}" if cname else str(pos))
            handles.append(child.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(child.register_forward_hook(post, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(pixel_values=pixel_values)
            droppable = set()
            for cname, container in containers:
                for pos, child in enumerate(container):
                    name = f"{cname}.{pos}" if cname else str(pos)
                    if name in calls and _passes_input_through(child, *calls[name], functional_call):
                        droppable.add(name)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    droppable = {d for d in droppable if not any(e.startswith(d + ".") for e in droppable)}
    blocks = []
    for cname, container in containers:
        names = [f"{cname}.{pos}" if cname else str(pos) for pos in range(len(container))]
        if not droppable & set(names):
            continue
        for pos, name in enumerate(names):
            blocks.append(Block(len(blocks), name, cname, pos, name in droppable))
    return blocks


def _passes_input_through(block, args, kwargs, output, functional_call) -> bool:
    import torch

    x, y = _first_tensor((args, kwargs)), _first_tensor(output)
    if x is None or y is None or x.shape != y.shape:
        return False
    zeros = {n: torch.zeros_like(p) for n, p in block.named_parameters()}
    if not zeros:
        return False  # a parameter-free layer (an activation, a pooling) is no block
    z = _first_tensor(functional_call(block, zeros, args, kwargs))
    if z is None or z.shape != x.shape:
        return False
    return bool(torch.allclose(z, x, rtol=1e-4, atol=1e-5 * float(x.abs().max()) + 1e-6))


def default_blocks(blocks: list[Block]) -> list[int]:
    """About half, stage by stage: a stage starts at each container's first block and
    at each block that cannot be dropped (a shape change, as where a flat MobileNetV2
    list moves to the next width); it keeps its first block and every other one after it."""
    keep, start = [], None
    for b in blocks:
        if b.position == 0 or not b.droppable:
            start = b.index
        if (b.index - start) % 2 == 0:
            keep.append(b.index)
    return keep


def check_blocks(blocks: list[Block], keep: list[int]) -> None:
    n = len(blocks)
    if not blocks:
        raise RecipeError("stages.distill.student.layers: the teacher has no block a student can drop (no "
                          "ModuleList/Sequential child with a skip connection); use another teacher")
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= n:
        raise RecipeError(f"stages.distill.student.layers: {keep} must list teacher blocks in increasing order, "
                          f"from 0..{n - 1}")
    fixed = [b for b in blocks if b.index not in keep and not b.droppable]
    if fixed:
        can = [b.index for b in blocks if b.droppable]
        raise RecipeError(f"stages.distill.student.layers: block {fixed[0].index} ({fixed[0].name}) changes shape or "
                          f"has no skip connection and must be kept; droppable blocks are {can}")


def plan_of(blocks: list[Block], keep: list[int]) -> dict:
    containers = {}
    for b in blocks:
        c = containers.setdefault(b.container, {"teacher_blocks": 0, "kept": []})
        c["teacher_blocks"] += 1
        if b.index in keep:
            c["kept"].append(b.position)
    return {"containers": containers}


def apply_plan(model, plan: dict, where: str = "student") -> None:
    """Remove the dropped blocks from their containers (the rest renumber, as a
    model built with fewer blocks numbers them). A container already of the kept
    length (its config counts blocks and was updated) is left alone."""
    for cname, c in plan["containers"].items():
        container = model.get_submodule(cname)
        if len(container) == len(c["kept"]):
            continue
        if len(container) != c["teacher_blocks"]:
            raise SourceError(f"{where}: {cname} has {len(container)} blocks, {PLAN_FILE} expects "
                              f"{c['teacher_blocks']} (or {len(c['kept'])} kept); the plan is for another model")
        for pos in reversed(range(len(container))):
            if pos not in c["kept"]:
                del container[pos]


def update_counts(model, plan: dict) -> dict:
    """Set the config fields that count blocks (COUNT_FIELDS) to the student's counts,
    when a model built from the updated config has exactly the student's tensors; then
    from_pretrained reloads the student alone. Returns {field: [teacher, student]}."""
    import torch
    from transformers import AutoModelForImageClassification

    before = [c["teacher_blocks"] for c in plan["containers"].values()]
    after = [len(c["kept"]) for c in plan["containers"].values()]
    config = model.config
    changes = {}
    for field in COUNT_FIELDS:
        value = getattr(config, field, None)
        if field == "num_hidden_layers" and value == sum(before) and len(before) == 1:
            changes[field] = [value, after[0]]
        elif isinstance(value, (list, tuple)) and list(value) == before:
            changes[field] = [list(value), after]
    if not changes:
        return {}
    trial = copy.deepcopy(config)
    for field, (_, new) in changes.items():
        setattr(trial, field, new)
    with torch.device("meta"):
        fresh = AutoModelForImageClassification.from_config(trial)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if {k: tuple(v.shape) for k, v in fresh.state_dict().items()} != want:
        return {}
    for field, (_, new) in changes.items():
        setattr(config, field, new)
    return changes


def derive_student(teacher, blocks: list[Block], keep: list[int]):
    """(the teacher without the blocks not in `keep`, its plan); every weight is the teacher's."""
    check_blocks(blocks, keep)
    student = copy.deepcopy(teacher)
    plan = plan_of(blocks, keep)
    apply_plan(student.model, plan)
    plan["config_updated"] = update_counts(student.model, plan)
    return student.eval(), plan


def save_model(student, plan: dict, out: Path, teacher_dir: Path) -> None:
    """config.json + model.safetensors (this transformers version's tensor names) +
    the teacher's preprocessor_config.json + PLAN_FILE."""
    import shutil

    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    student.model.config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in student.model.state_dict().items()}, str(out / STUDENT_WEIGHTS),
              metadata={"format": "pt"})
    if (Path(teacher_dir) / PREPROCESSOR_FILE).is_file():
        shutil.copyfile(Path(teacher_dir) / PREPROCESSOR_FILE, out / PREPROCESSOR_FILE)
    (out / PLAN_FILE).write_text(json.dumps(plan, indent=2, sort_keys=True))


# -- distill -------------------------------------------------------------------------

def distill(src: Artifact, cfg, ctx) -> Artifact:
    """Stage `distill` for an hf: image teacher: blocks dropped, then logit KD (with
    cross-entropy when the images have labels) and feature KD on the pooled features
    the classifier reads (the teacher's and student's have the same width)."""
    import torch

    from compress.vision import train

    teacher = load_model(src.path)
    with torch.no_grad():
        x = teacher.inputs(torch.from_numpy(ctx.images.train.pixels[:2]))
    blocks = find_blocks(teacher.model, x)
    keep = list(cfg.student.layers) if cfg.student.layers else default_blocks(blocks)
    student, plan = derive_student(teacher, blocks, keep)
    kept_names = [b.name for b in blocks if b.index in keep]
    log.info("distill: %d of %d blocks kept: %s", len(keep), len(blocks), ", ".join(kept_names))
    stats = train(student, teacher, [0], ctx.images.train, cfg, ctx.progress)
    save_model(student, plan, ctx.out, src.path)
    return seal(ctx.out, "torch", {
        **src.meta,
        "parent": src.digest,
        "layers": keep,
        "num_layers": len(keep),
        "structure": {"blocks": [b.name for b in blocks],  # by index
                      "droppable": [b.index for b in blocks if b.droppable],
                      "blocks_kept": keep, "blocks_dropped": [b.index for b in blocks if b.index not in keep],
                      "containers": plan["containers"], "config_updated": plan["config_updated"]},
        "params": count_params(student),
        "teacher_params": count_params(teacher),
        **stats,
        "train_inputs": len(ctx.images.train),
    })
