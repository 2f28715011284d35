"""What differs per task, in one place: the recipe rules of each task and the
eval/fidelity/retention functions the build calls. Embedding lives in
evaluate/models; classification in classify; causal-lm in lm_distill/lm_eval.
Light at import: recipe validation runs this.
"""

from __future__ import annotations

from pathlib import Path

from compress.errors import RecipeError

TASKS = ("embedding", "classification", "causal-lm")
# Example sources that carry labels (the rest of example: are unlabelled texts or similarity sets).
LABELLED_EXAMPLES = ("example:polarity", "example:polarity-train", "example:polarity-test")
LABELLED_SUFFIXES = (".tsv", ".csv")


def _has_labels(source) -> bool:
    if source.source in LABELLED_EXAMPLES or Path(source.source).suffix in LABELLED_SUFFIXES:
        return True
    return Path(source.source).suffix == ".jsonl" and source.label_field is not None


def check_recipe(recipe) -> None:
    """A task's needs from data, losses and stages: one line naming the field and the fix."""
    from compress.recipe import LmDistillConfig

    d = recipe.data
    distill = next((e.distill for e in recipe.stages if e.distill is not None), None)
    if recipe.task == "causal-lm":
        return _check_causal_lm(recipe)
    if isinstance(distill, LmDistillConfig):  # only when built in code: a YAML distill reads by task
        raise RecipeError(f"stages.distill: causal-lm distillation settings on task {recipe.task}; "
                          "set task: causal-lm or use the encoder distill fields")
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


def _check_causal_lm(recipe) -> None:
    from compress.data import EXAMPLE_EVAL

    d = recipe.data
    teacher = recipe.teacher.source
    if teacher.startswith("onnx:") or teacher.endswith(".onnx"):
        raise RecipeError(f"teacher.source: task causal-lm distils a torch model, got the ONNX file {teacher}; "
                          "use hf:<dir> of an AutoModelForCausalLM (save it with save_pretrained)")
    if teacher.startswith("example:"):
        raise RecipeError(f"teacher.source: {teacher} is a BERT encoder, not a causal language model; "
                          "use hf:<dir> of an AutoModelForCausalLM (GPT-2 or Llama family)")
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


def evaluate(task: str, encoder, eval_sets: list, heldout: list[str], reference=None):
    """(metric per eval set, held-out outputs) for one runnable artifact. causal-lm
    compares next tokens with `reference` (the teacher's outputs; None: itself)."""
    if task == "causal-lm":
        from compress import lm_eval

        return lm_eval.evaluate(encoder, eval_sets, heldout, reference)
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
    if task == "classification":
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
