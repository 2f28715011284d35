"""What differs per task, in one place: the recipe rules of each task and the
eval/fidelity functions the build calls. Embedding lives in evaluate/models;
classification in classify. Light at import: recipe validation runs this.
"""

from __future__ import annotations

from pathlib import Path

from compress.errors import RecipeError

TASKS = ("embedding", "classification")
# Example sources that carry labels (the rest of example: are unlabelled texts or similarity sets).
LABELLED_EXAMPLES = ("example:polarity", "example:polarity-train", "example:polarity-test")
LABELLED_SUFFIXES = (".tsv", ".csv")


def _has_labels(source) -> bool:
    if source.source in LABELLED_EXAMPLES or Path(source.source).suffix in LABELLED_SUFFIXES:
        return True
    return Path(source.source).suffix == ".jsonl" and source.label_field is not None


def check_recipe(recipe) -> None:
    """A task's needs from data, losses and stages: one line naming the field and the fix."""
    d = recipe.data
    distill = next((e.distill for e in recipe.stages if e.distill is not None), None)
    if distill is not None and "generations" in distill.model_fields_set \
            and not ("self" in distill.losses and distill.self_mode == "born-again"):
        raise RecipeError("stages.distill.generations: generations are born-again self-distillation; add self to "
                          "losses (self_mode: born-again) or drop generations")
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


def evaluate(task: str, encoder, eval_sets: list, heldout: list[str]):
    """(metric per eval set, held-out outputs) for one runnable artifact."""
    if task == "classification":
        from compress import classify

        return classify.evaluate(encoder, eval_sets, heldout)
    from compress import evaluate as ev

    return ev.run(encoder, eval_sets, heldout)


def fidelity(task: str, outputs, teacher_outputs) -> dict[str, float]:
    """Closeness to the teacher on held-out inputs; `cosine` is always present
    (gates.fidelity and quantize mode auto read it)."""
    if task == "classification":
        from compress import classify

        return classify.fidelity(outputs, teacher_outputs)
    from compress import evaluate as ev

    return ev.fidelity(outputs, teacher_outputs)
