"""What differs per task, in one place: the recipe rules of each task and the
eval/fidelity/retention functions the build calls. Embedding lives in
evaluate/models; classification in classify; causal-lm in lm_distill/lm_eval.
Light at import: recipe validation runs this.
"""

from __future__ import annotations

from pathlib import Path

from compress.errors import RecipeError

TASKS = ("embedding", "classification", "causal-lm", "image-classification")
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
    from compress.recipe import LmDistillConfig

    d = recipe.data
    distill = next((e.distill for e in recipe.stages if e.distill is not None), None)
    for i, s in enumerate(d.extra_train):
        if s.label_field is not None:
            raise RecipeError(f"data.extra_train[{i}].label_field: extra_train inputs are unlabelled (the teacher "
                              "labels them); put labelled data in data.train")
        if _is_images(s.source):
            raise RecipeError(f"data.extra_train[{i}]: {s.source} holds images; extra_train adds text inputs")
    if recipe.task == "causal-lm":
        return _check_causal_lm(recipe)
    if recipe.task == "image-classification":
        return check_image_recipe(recipe, distill)
    if isinstance(distill, LmDistillConfig):  # only when built in code: a YAML distill reads by task
        raise RecipeError(f"stages.distill: causal-lm distillation settings on task {recipe.task}; "
                          "set task: causal-lm or use the encoder distill fields")
    # By value, not model_fields_set: a report's recipe (re-read by `compress bench`) spells out every field.
    if distill is not None and distill.generations is not None \
            and not ("self" in distill.losses and distill.self_mode == "born-again"):
        raise RecipeError("stages.distill.generations: generations are born-again self-distillation; add self to "
                          "losses (self_mode: born-again) or drop generations")
    if recipe.teacher.source == IMAGE_TEACHER:
        raise RecipeError(f"teacher.source: {IMAGE_TEACHER} is an image classifier; set task: image-classification")
    for where, s in [("data.train", d.train), *((f"data.eval[{i}]", e) for i, e in enumerate(d.eval))]:
        if _is_images(s.source):
            raise RecipeError(f"{where}: {s.source} holds images, task {recipe.task} reads texts; "
                              "set task: image-classification or give text data")
    # Compared with the defaults, not model_fields_set: a report's recipe (re-read by
    # `compress bench`) spells out every field.
    if distill is not None and recipe.task != "embedding" and distill.student.hidden is not None:
        raise RecipeError(f"stages.distill.student.hidden: a narrower hidden width is implemented for task embedding "
                          f"only, not {recipe.task}; drop hidden (student.ffn and student.heads narrow the student)")
    if distill is not None and recipe.task not in ("embedding", "classification") \
            and distill.student.config is not None:
        raise RecipeError(f"stages.distill.student.config: a student given as a config is implemented for tasks "
                          f"embedding and classification, not {recipe.task}; drop config (student.layers, ffn and heads derive the "
                          "student from the teacher)")
    if distill is not None and distill.student.channels != _default("channels"):
        raise RecipeError("stages.distill.student.channels: narrows CNN blocks (task image-classification); "
                          "use student.ffn and student.heads for a transformer")
    if recipe.task == "embedding":
        if distill is not None and "logit" in distill.losses:
            raise RecipeError("stages.distill.losses: logit needs class logits (task classification); "
                              "use feature and/or attention for task embedding")
        if distill is not None and "self" in distill.losses and not {"feature", "attention"} & set(distill.losses):
            raise RecipeError("stages.distill.losses: self needs feature and/or attention beside it (they bring the "
                              "teacher's knowledge that self-distillation refines); e.g. losses: [feature, self]")
        for where, s in [("data.train", d.train), *((f"data.eval[{i}]", e) for i, e in enumerate(d.eval))]:
            if s.label_field is not None:
                raise RecipeError(f"{where}.label_field: labels are read for task classification only; "
                                  "drop label_field or set task: classification")
        return
    # classification
    if distill is not None and "self" in distill.losses:
        raise RecipeError("stages.distill.losses: self is implemented for task embedding; classification distills "
                          "with logit (and feature/attention) for now")
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


def _check_causal_lm(recipe) -> None:
    from compress.data import EXAMPLE_EVAL

    d = recipe.data
    teacher = recipe.teacher.source
    if teacher.startswith("onnx:") or teacher.endswith(".onnx"):
        raise RecipeError(f"teacher.source: task causal-lm distils a torch model, got the ONNX file {teacher}; "
                          "use hf:<dir> of an AutoModelForCausalLM (save it with save_pretrained)")
    if teacher.startswith("example:"):
        raise RecipeError(f"teacher.source: {teacher} is a BERT encoder, not a causal language model; "
                          "use hf:<dir> of an AutoModelForCausalLM (tested: GPT-2, Llama, Qwen2, GPT-NeoX, OPT)")
    for where, s in [("data.train", d.train), *((f"data.eval[{i}]", e) for i, e in enumerate(d.eval))]:
        if s.label_field is not None:
            raise RecipeError(f"{where}.label_field: labels are read for task classification only; drop label_field")
    for i, e in enumerate(d.eval):
        if e.source.removeprefix("example:") in EXAMPLE_EVAL:
            raise RecipeError(f"data.eval[{i}]: {e.source} is a similarity set; task causal-lm scores plain texts: "
                              "give a .txt (one text per line), a .jsonl with field, or example:corpus")
    for entry in recipe.stages:
        if entry.name in ("prune", "fuse"):
            raise RecipeError(f"stages.{entry.name}: task causal-lm is not supported by {entry.name} yet; remove it "
                              "(stages.distill.layers picks fewer teacher blocks)")
        q = entry.quantize
        if q is None:
            continue
        if q.mode == "qat" or (q.mode == "auto" and "qat" in q.candidates):
            raise RecipeError("stages.quantize: qat trains encoder features and does not apply to task causal-lm; "
                              "use mode dynamic or static (or auto with candidates [dynamic, static])")
        if q.fallback.enabled:
            raise RecipeError("stages.quantize.fallback: the fp32 fallback compares sentence embeddings and does "
                              "not apply to task causal-lm yet; set fallback.enabled: false")


def check_image_recipe(recipe, distill) -> None:
    """Task image-classification: an image teacher, image data with labelled eval
    sets, and only the stages and options that apply to a CNN."""
    d = recipe.data
    teacher = recipe.teacher.source
    if teacher.startswith("onnx:") or teacher.endswith(".onnx") \
            or (teacher.startswith("example:") and teacher != IMAGE_TEACHER):
        raise RecipeError(f"teacher.source: task image-classification needs {IMAGE_TEACHER}, hf:<dir> of an "
                          "AutoModelForImageClassification, or an MBConv model directory (config.json + "
                          f"model.safetensors, see compress.vision.save_model), got {teacher}")
    if recipe.teacher.tokenizer is not None:
        raise RecipeError("teacher.tokenizer: images have no tokenizer; remove it")
    if d.extra_train:
        raise RecipeError("data.extra_train: adds text inputs; for task image-classification put the images in data.train")
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
        if "self" in distill.losses:
            raise RecipeError("stages.distill.losses: self is implemented for task embedding; a CNN takes logit "
                              "and/or feature")
        student = distill.student
        if student.hidden is not None:
            raise RecipeError("stages.distill.student.hidden: a narrower hidden width is implemented for task "
                              "embedding only; for a CNN use student.layers and student.channels")
        if student.config is not None:
            raise RecipeError("stages.distill.student.config: a student given as a config is implemented for task "
                              "embedding only; for a CNN use student.layers and student.channels")
        if student.heads or student.ffn != _default("ffn"):
            raise RecipeError("stages.distill.student: heads and ffn narrow transformers; for a CNN use "
                              "student.layers (blocks kept) and student.channels")
        if teacher.startswith("hf:") and student.channels not in (0.0, _default("channels")):
            raise RecipeError("stages.distill.student.channels: narrows MBConv blocks only; for an hf: teacher "
                              "remove channels (student.layers chooses the blocks kept)")
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


def evaluate(task: str, encoder, eval_sets: list, heldout: list[str], reference=None):
    """(metric per eval set, held-out outputs) for one runnable artifact. causal-lm
    compares next tokens with `reference` (the teacher's outputs; None: itself)."""
    if task == "causal-lm":
        from compress import lm_eval

        return lm_eval.evaluate(encoder, eval_sets, heldout, reference)
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
    if task == "causal-lm":
        from compress import lm_eval

        return lm_eval.fidelity(outputs, teacher_outputs)
    if task in ("classification", "image-classification"):
        from compress import classify

        return classify.fidelity(outputs, teacher_outputs)
    from compress import evaluate as ev

    return ev.fidelity(outputs, teacher_outputs)


def retention(task: str, metrics: dict[str, float], teacher: dict[str, float]) -> dict[str, float]:
    """Share of the teacher's quality each metric keeps. causal-lm perplexity is
    lower-is-better: its retention is ppl_teacher / ppl_artifact."""
    from compress import evaluate as ev

    kept = ev.retention(metrics, teacher)
    if task == "causal-lm":
        from compress.lm_eval import LOWER_IS_BETTER

        for name in kept:
            if name.endswith(LOWER_IS_BETTER):
                kept[name] = teacher[name] / metrics[name] if metrics[name] else float("nan")
    return kept
