"""What differs per task, in one place: the recipe rules of each task and the
eval/fidelity functions the build calls. Embedding lives in evaluate/models;
classification in classify. Light at import: recipe validation runs this.
"""

from __future__ import annotations

from pathlib import Path

from compress.errors import RecipeError

TASKS = ("embedding", "classification", "image-classification")
IMAGE_EXAMPLES = ("example:fashion-mnist-train", "example:fashion-mnist-test")
IMAGE_TEACHER = "example:efficientnet-lite0-fashion"


def _is_images(source: str) -> bool:
    return source in IMAGE_EXAMPLES or Path(source).suffix == ".npz"
# Example sources that carry labels (the rest of example: are unlabelled texts or similarity sets).
LABELLED_EXAMPLES = ("example:polarity", "example:polarity-train", "example:polarity-test")
LABELLED_SUFFIXES = (".tsv", ".csv")


def _has_labels(source) -> bool:
    if source.source in LABELLED_EXAMPLES or Path(source.source).suffix in LABELLED_SUFFIXES:
        return True
    return Path(source.source).suffix == ".jsonl" and source.label_field is not None


def _default(field: str):
    from compress.recipe import StudentConfig

    return StudentConfig.model_fields[field].default


def check_recipe(recipe) -> None:
    """A task's needs from data, losses and stages: one line naming the field and the fix."""
    d = recipe.data
    distill = next((e.distill for e in recipe.stages if e.distill is not None), None)
    if recipe.task == "image-classification":
        return check_image_recipe(recipe, distill)
    if recipe.teacher.source == IMAGE_TEACHER:
        raise RecipeError(f"teacher.source: {IMAGE_TEACHER} is an image classifier; set task: image-classification")
    for where, s in [("data.train", d.train), *((f"data.eval[{i}]", e) for i, e in enumerate(d.eval))]:
        if _is_images(s.source):
            raise RecipeError(f"{where}: {s.source} holds images, task {recipe.task} reads texts; "
                              "set task: image-classification or give text data")
    # Compared with the defaults, not model_fields_set: a report's recipe (re-read by
    # `compress bench`) spells out every field.
    if distill is not None and distill.student.channels != _default("channels"):
        raise RecipeError("stages.distill.student.channels: narrows CNN blocks (task image-classification); "
                          "use student.ffn and student.heads for a transformer")
    if recipe.task == "embedding":
        if distill is not None and "logit" in distill.losses:
            raise RecipeError("stages.distill.losses: logit needs class logits (task classification); "
                              "use feature and/or attention for task embedding")
        for where, s in [("data.train", d.train), *((f"data.eval[{i}]", e) for i, e in enumerate(d.eval))]:
            if s.label_field is not None:
                raise RecipeError(f"{where}.label_field: labels are read for task classification only; "
                                  "drop label_field or set task: classification")
        return
    # classification
    teacher = recipe.teacher.source
    if teacher.startswith("onnx:") or teacher.endswith(".onnx"):
        raise RecipeError(f"teacher.source: task classification needs a Hugging Face sequence classifier "
                          f"(hf:<dir>), got {teacher}; ONNX classification teachers are not supported yet")
    if teacher == "example:minilm":
        raise RecipeError("teacher.source: example:minilm is a sentence encoder without a classification head; "
                          "use example:minilm-polarity or hf:<dir> of an AutoModelForSequenceClassification")
    if not d.eval:
        raise RecipeError("data.eval: task classification needs at least one labelled eval set; "
                          "add e.g. {source: example:polarity-test}")
    for i, e in enumerate(d.eval):
        if _has_labels(e):
            continue
        if Path(e.source).suffix == ".jsonl":
            raise RecipeError(f"data.eval[{i}]: task classification needs labels; set label_field "
                              f"(the key of each row's label in {e.source})")
        raise RecipeError(f"data.eval[{i}]: task classification needs labels, but {e.source} has none; use "
                          "example:polarity-test, a .jsonl with field and label_field, or a .tsv/.csv of text<TAB>label")
    if any(e.name == "prune" for e in recipe.stages):
        raise RecipeError("stages.prune: task classification is not supported by prune yet; remove it "
                          "(stages.distill.student.ffn and .heads narrow the student instead)")


def check_image_recipe(recipe, distill) -> None:
    """Task image-classification: an image teacher, image data with labelled eval
    sets, and only the stages and options that apply to a CNN."""
    d = recipe.data
    teacher = recipe.teacher.source
    if teacher.startswith("onnx:") or teacher.endswith(".onnx") or teacher.startswith("hf:") \
            or (teacher.startswith("example:") and teacher != IMAGE_TEACHER):
        raise RecipeError(f"teacher.source: task image-classification needs {IMAGE_TEACHER} or an image model "
                          f"directory (config.json + model.safetensors, see compress.vision.save_model), got {teacher}")
    if recipe.teacher.tokenizer is not None:
        raise RecipeError("teacher.tokenizer: images have no tokenizer; remove it")
    sources = [("data.train", d.train), *((f"data.eval[{i}]", e) for i, e in enumerate(d.eval))]
    if d.calibration is not None:
        sources.append(("data.calibration", d.calibration))
    for where, s in sources:
        if not _is_images(s.source):
            raise RecipeError(f"{where}: task image-classification reads images ({' or '.join(IMAGE_EXAMPLES)}, or a "
                              f".npz with images and labels), got {s.source}")
        if s.field is not None or s.label_field is not None:
            raise RecipeError(f"{where}: field and label_field name JSONL keys of texts; remove them "
                              "(a .npz holds arrays named images and labels)")
    if not d.eval:
        raise RecipeError("data.eval: task image-classification needs at least one labelled eval set; "
                          "add e.g. {source: example:fashion-mnist-test, samples: 1000}")
    for entry in recipe.stages:
        if entry.name in ("prune", "fuse"):
            raise RecipeError(f"stages.{entry.name}: not supported for task image-classification (it works on "
                              "transformer layers); remove it (stages.distill.student narrows the CNN instead)")
    if distill is not None:
        if "attention" in distill.losses:
            raise RecipeError("stages.distill.losses: attention needs self-attention; a CNN takes logit and/or feature")
        student = distill.student
        if student.heads or student.ffn != _default("ffn"):
            raise RecipeError("stages.distill.student: heads and ffn narrow transformers; for a CNN use "
                              "student.layers (blocks kept) and student.channels")
    q = next((e.quantize for e in recipe.stages if e.quantize is not None), None)
    if q is not None:
        if q.dtype != "int8":
            raise RecipeError(f"stages.quantize.dtype: {q.dtype} is not supported for task image-classification; "
                              "set dtype: int8")
        if q.mode == "qat" or (q.mode == "auto" and "qat" in q.candidates):
            raise RecipeError("stages.quantize: qat is not supported for task image-classification; use mode "
                              "static (QDQ Convs), dynamic, or auto with candidates [dynamic, static]")
        if q.fallback.enabled:
            raise RecipeError("stages.quantize.fallback: the fp32 fallback ranks MatMuls of transformers; set "
                              "fallback.enabled: false for task image-classification")


def evaluate(task: str, encoder, eval_sets: list, heldout: list[str]):
    """(metric per eval set, held-out outputs) for one runnable artifact."""
    if task == "image-classification":
        from compress import vision

        return vision.evaluate(encoder, eval_sets, heldout)
    if task == "classification":
        from compress import classify

        return classify.evaluate(encoder, eval_sets, heldout)
    from compress import evaluate as ev

    return ev.run(encoder, eval_sets, heldout)


def fidelity(task: str, outputs, teacher_outputs) -> dict[str, float]:
    """Closeness to the teacher on held-out inputs; `cosine` is always present
    (gates.fidelity and quantize mode auto read it)."""
    if task in ("classification", "image-classification"):
        from compress import classify

        return classify.fidelity(outputs, teacher_outputs)
    from compress import evaluate as ev

    return ev.fidelity(outputs, teacher_outputs)
