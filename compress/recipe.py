"""The recipe: compress.yaml validated into frozen, typed configs.

Everything a build does is decided here, before any stage runs; `compress
schema` prints the JSON Schema of `Recipe`. Field names are stable API.
"""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, StrictInt, Tag, ValidationError, field_validator,
                      model_validator)

from compress.errors import RecipeError


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TeacherConfig(Frozen):
    source: str = Field("example:minilm", description="hf:<dir> | example:minilm | onnx:<file> (ONNX teachers are eval-only: no distill); causal-lm: hf:<dir> of a decoder-only AutoModelForCausalLM whose blocks are one module list (tested: GPT-2, Llama, Qwen2, GPT-NeoX, OPT; encoder-decoders are an error); image-classification: example:efficientnet-lite0-fashion | hf:<dir> of any AutoModelForImageClassification (ResNet, ConvNeXt, MobileNetV2, EfficientNet, ViT, ...; its preprocessor_config.json gives size, mean and std) | an MBConv model directory (config.json + model.safetensors, see compress.vision.save_model)")
    tokenizer: str | None = Field(None, description="Tokenizer directory; needed for onnx: teachers, otherwise the teacher's own")
    max_length: int = Field(256, ge=8, le=4096, description="Longest input in tokens; longer inputs are truncated")


class DataSource(Frozen):
    source: str = Field(description="example:<name> | a .txt file (one input per line) | a .jsonl file (with `field`); image-classification: example:fashion-mnist-train | example:fashion-mnist-test | a .npz with images (uint8 [n, h, w(, c)]), labels and optionally classes (names in id order, checked against the teacher's id2label)")
    field: str | None = Field(None, description="JSONL: the key holding the text")
    samples: int | None = Field(None, ge=1, description="Use at most this many inputs (the first ones)")
    label_field: str | None = Field(None, description="classification, JSONL: the key holding the label (an int, or a name in the teacher's config.label2id); .tsv/.csv rows are text<TAB>label")


class DataConfig(Frozen):
    train: DataSource = Field(DataSource(source="example:corpus"), description="Unlabelled inputs the student learns from")
    extra_train: list[DataSource] = Field(default_factory=list, description="More unlabelled text inputs, appended to data.train (before the held-out split): a transfer set the teacher labels, e.g. unlabelled in-domain text beside a small labelled classification set")
    calibration: DataSource | None = Field(None, description="Inputs for static quantization ranges (default: 256 train inputs)")
    heldout_fraction: float = Field(0.05, gt=0, lt=0.5, description="Share of train inputs held out (by hash) for fidelity")
    heldout_samples: int = Field(1000, ge=20, description="At most this many held-out inputs are scored")
    eval: list[DataSource] = Field(
        default_factory=lambda: [DataSource(source="example:lee-similarity"),
                                 DataSource(source="example:wordsim353"),
                                 DataSource(source="example:simlex999")],
        description="Task eval sets; retention = metric(build) / metric(teacher) on each. causal-lm: plain texts (.txt, .jsonl with field, example:corpus), none by default (the held-out split is always scored)")


class StudentConfig(Frozen):
    layers: list[int] | None = Field(None, description="Teacher layers the student keeps (default: every other, ending with the last); with config: the teacher layer each student layer learns, one per student layer (default: evenly spaced, ending with the last); image-classification: teacher blocks kept, numbered over every container of blocks (MBConv: its blocks; hf: the ModuleList/Sequential children a probe forward finds droppable, see the distill meta's structure); only residual blocks (same output shape as input, a skip connection) can go (default: MBConv every block that changes shape and every other residual block; hf: per stage its first block and every other one after it)")
    ffn: float = Field(0.35, ge=0, lt=1, description="Share of FFN neurons removed from every kept layer before training (Taylor-ranked)")
    heads: float = Field(0.0, ge=0, lt=1, description="Share of attention heads removed from every kept layer before training")
    hidden: int | None = Field(None, ge=1, description="task embedding: the student's hidden (residual stream) width, a multiple of the teacher's head size below its hidden size (default: the teacher's). Kept dimensions and whole heads are chosen by weight magnitude and sliced from the teacher; a learned Linear(hidden -> teacher hidden) on the pooled output keeps embeddings in the teacher's space and is exported with the model")
    channels: float = Field(0.5, ge=0, lt=1, description="image-classification with an MBConv teacher: share of the expanded channels of every kept MBConv block, and of the head's channels, removed before training (smallest |BN scale| x L1 weight norm first); block outputs keep the teacher's widths. Not applied to hf: teachers (any other value than the default or 0 is an error)")
    config: dict[str, Any] | str | None = Field(None, description="tasks embedding and classification: the student given as a Hugging Face config instead of derived: a mapping of fields overriding the teacher's config (e.g. {num_hidden_layers: 4, hidden_size: 256, num_attention_heads: 4, intermediate_size: 1024}) or the path of a config.json; a model of the teacher's type, randomly initialised except its embeddings (the teacher's, at the residual dimensions student.hidden would keep). Not with hidden, heads or ffn; layers, if given, has one teacher layer per student layer (default: evenly spaced, ending with the last). A narrower embedding student gets the output projection as with hidden; a classifier of the teacher's width starts from the teacher's head, a narrower one from a fresh head and distils with losses [logit] or [logit, attention]")

    @field_validator("config", mode="before")
    @classmethod
    def config_fields(cls, value: Any) -> Any:
        from compress.models import student_config_problem

        if value is not None and not isinstance(value, (str, dict)) \
                or isinstance(value, dict) and not all(isinstance(k, str) for k in value):
            raise ValueError(f"must be a mapping of Hugging Face config fields (e.g. {{hidden_size: 256}}) or the "
                             f"path of a config.json, got {value!r}")
        if isinstance(value, str) and not value.strip():
            raise ValueError("is an empty path; give a config.json path or a mapping of config fields")
        if isinstance(value, dict):
            problem = student_config_problem(value)
            if problem:
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def one_way(self) -> "StudentConfig":
        # ffn is compared with its default (and 0, no narrowing), not model_fields_set:
        # a report's recipe spells out every field.
        if self.config is not None and (self.hidden is not None or self.heads > 0
                                        or self.ffn not in (0.0, type(self).model_fields["ffn"].default)):
            raise ValueError("config gives the student's shape itself; drop hidden, heads and ffn (they narrow a "
                             "student derived from the teacher), or drop config: pick one way")
        return self


class DistillConfig(Frozen):
    student: StudentConfig = Field(StudentConfig(), description="How the student is derived from the teacher, or given as a config (student.config)")
    losses: list[Literal["feature", "attention", "logit", "self"]] = Field(["feature"], min_length=1, description="Distillation losses: feature (pooled embedding + hidden states, relative MSE + cosine), attention (MiniLM-v2 self-attention relations of the last layer, KL), logit (classification: Hinton's KL of temperature-softened class distributions, times T^2), self (self-distillation, see self_mode; with feature and/or attention, which bring the teacher); image-classification: feature is each kept MBConv block's output, or for an hf: teacher the pooled features its classifier reads. The teacher outputs these read are computed once per teacher, train inputs, max_length, layers and relation settings and kept in the teacher-output cache, so changing only lr, epochs, temperature, alpha or the weights reruns no teacher forward")
    self_mode: Literal["born-again", "deep-to-shallow"] = Field("born-again", description="self: born-again (after the first generation, each generation starts from a trained copy of the student and learns from the teacher and from that frozen copy) or deep-to-shallow (every shallower layer's mean-pooled state learns the student's own final embedding)")
    generations: int | None = Field(None, ge=1, le=8, description="self, born-again: student generations trained one after the other (default 2; 1 = plain distillation)")
    self_weight: float = Field(1.0, ge=0, description="self: weight of the self-distillation loss")
    attention_weight: float = Field(1.0, ge=0, description="Weight of the attention-relation loss")
    relation_heads: int = Field(12, ge=1, description="attention: relation heads Q, K, V are split into (the same for teacher and student, so head counts may differ)")
    epochs: int = Field(4, ge=1, description="Passes over the train inputs")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs)")
    batch_size: int = Field(32, ge=1, description="Inputs per optimizer step and process (--nproc N: a step takes batch_size x N, dealt out among the processes)")
    max_length: int = Field(128, ge=8, description="Training inputs are truncated to this many tokens")
    lr: float = Field(1e-4, gt=0, description="Peak AdamW learning rate")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    warmup: float = Field(0.06, ge=0, lt=1, description="Share of steps for linear warm-up")
    pooled_weight: float = Field(1.0, ge=0, description="Weight of the pooled-embedding loss")
    hidden_weight: float = Field(1.0, ge=0, description="Weight of the per-layer hidden-state loss")
    logit_weight: float = Field(1.0, ge=0, description="logit: weight of the logit loss against the feature and attention losses")
    temperature: float = Field(2.0, gt=0, description="logit: softmax temperature of teacher and student logits")
    alpha: float = Field(0.5, ge=0, le=1, description="logit: weight of the soft (teacher) loss; 1 - alpha goes to cross-entropy on the true labels, used only when the train inputs have labels")
    bf16: bool = Field(True, description="Train under bf16 autocast when the CPU supports it (about 3x faster here)")
    teacher_topk: int = Field(64, ge=1, description="Language-model teachers: logits kept per position in the teacher-output cache, as fp16 values + int32 token ids (task causal-lm reads its own stages.distill.teacher_topk)")
    seed: int = Field(0, description="Seed for initialisation order, shuffling and dropout")

    @field_validator("losses", mode="before")
    @classmethod
    def encoder_losses(cls, value: Any) -> Any:
        if isinstance(value, list) and "on_policy" in value:
            raise ValueError("on_policy distils a causal language model; set task: causal-lm, or use feature, "
                             "attention or logit for an encoder")
        return value


class LmDistillConfig(Frozen):
    """Distillation of a causal LM (task causal-lm); compress/lm_distill.py."""

    layers: list[int] | None = Field(None, description="Teacher blocks the student keeps, in this order (default: every other, ending with the last); the blocks are the module list of config.num_hidden_layers entries, whatever the family calls it, and per-layer config lists (layer_types: sliding or full attention) follow the kept blocks")
    losses: list[Literal["logit", "on_policy"]] = Field(["logit"], min_length=1, description="logit: KL(teacher || student) at every token of the train texts (off-policy); on_policy: GKD, the divergence on continuations the student samples from prompts")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the losses (logit KL is scaled by T^2)")
    beta: float = Field(0.9, ge=0, le=1, description="on_policy divergence: 0 forward KL, 1 reverse KL, between the generalized JSD(beta); 0.9 leans to the mode-seeking reverse KL")
    lmbda: float = Field(1.0, ge=0, le=1, description="on_policy: share of batches on student-generated continuations; the rest use the train texts (GKD's lambda)")
    max_new_tokens: int = Field(32, ge=1, description="on_policy: tokens the student samples after each prompt")
    sample_temperature: float = Field(1.0, ge=0, description="on_policy: sampling temperature of the student (0: greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="on_policy: nucleus sampling mass (1: the whole vocabulary)")
    prompt_tokens: int = Field(16, ge=1, description="on_policy: prompts are the first this many tokens of train texts (shorter texts are not used as prompts)")
    hard_label_weight: float = Field(0.0, ge=0, description="Weight of next-token cross entropy on the train texts, added to the logit loss")
    teacher_topk: int = Field(64, ge=1, description="Teacher logits kept per position of the train texts in the teacher-output cache (fp16 values + int32 token ids, capped at the vocabulary size); the losses on train texts compare the distributions over that top-k set")
    max_length: int = Field(128, ge=8, description="Train texts are truncated to this many tokens")
    epochs: int = Field(2, ge=1, description="Passes over the train texts")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs)")
    batch_size: int = Field(16, ge=1, description="Texts (or prompts) per optimizer step and process (--nproc N: a step takes batch_size x N, dealt out among the processes)")
    lr: float = Field(1e-4, gt=0, description="Peak AdamW learning rate")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    warmup: float = Field(0.06, ge=0, lt=1, description="Share of steps for linear warm-up")
    seed: int = Field(0, description="Seed for shuffling, the on/off-policy draw and sampling")

    @model_validator(mode="before")
    @classmethod
    def no_student_block(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("student"), dict) and "hidden" in value["student"]:
            raise ValueError("student.hidden: a narrower hidden width is implemented for task embedding only; "
                             "drop it (layers picks fewer teacher blocks)")
        if isinstance(value, dict) and isinstance(value.get("student"), dict) and "config" in value["student"]:
            raise ValueError("student.config: a student given as a config is implemented for task embedding only; "
                             "drop it (layers picks fewer teacher blocks)")
        if isinstance(value, dict) and "student" in value:
            raise ValueError("task causal-lm picks the student's blocks with layers: [teacher block indices], "
                             "not student:; move student.layers to layers (ffn and heads do not apply)")
        return value

    @field_validator("losses", mode="before")
    @classmethod
    def lm_losses(cls, value: Any) -> Any:
        if isinstance(value, list):
            wrong = [v for v in value if v in ("feature", "attention")]
            if wrong:
                raise ValueError(f"{wrong[0]} matches an encoder's hidden states; task causal-lm distils with "
                                 "logit and/or on_policy")
        return value


# The distill stage's config type depends on the recipe's task, which pydantic
# validates beside the stages, not above them: Recipe sets it here while its
# fields are validated, and the distill field reads it (see _distill_kind).
_TASK: contextvars.ContextVar[str] = contextvars.ContextVar("recipe_task", default="embedding")
_DISTILL_TAGS = ("encoder", "causal-lm")


def _distill_kind(value: Any) -> str:
    if isinstance(value, LmDistillConfig):
        return "causal-lm"
    if isinstance(value, DistillConfig):
        return "encoder"
    return "causal-lm" if _TASK.get() == "causal-lm" else "encoder"


DistillEntry = Annotated[Union[Annotated[DistillConfig, Tag("encoder")], Annotated[LmDistillConfig, Tag("causal-lm")]],
                         Discriminator(_distill_kind)]
class SparsityConfig(Frozen):
    pattern: Literal["none", "unstructured", "2:4"] = Field("none", description="Zeros in the encoder's Linear weights after structured pruning: none; unstructured (smallest |w| per Linear); 2:4 (at most 2 nonzero in every 4 consecutive inputs, for sparse tensor cores); quote it in YAML: '2:4'")
    amount: float = Field(0.5, ge=0, lt=1, description="unstructured: share of each selected Linear's weights set to zero")
    linears: list[Literal["attention", "attention_output", "ffn_in", "ffn_out"]] = Field(
        ["attention", "attention_output", "ffn_in", "ffn_out"], min_length=1,
        description="Which Linears are sparsified: attention (Q, K, V projections), attention_output, ffn_in, ffn_out")

    @field_validator("pattern", mode="before")
    @classmethod
    def sexagesimal(cls, value: Any) -> Any:
        # YAML 1.1 (PyYAML) reads an unquoted 2:4 as the base-60 integer 124.
        return "2:4" if value == 124 else value


class PruneConfig(Frozen):
    heads: float = Field(0.25, ge=0, lt=1, description="Share of attention heads removed in every layer (at least one head stays)")
    ffn: float = Field(0.3, ge=0, lt=1, description="Share of FFN neurons removed in every layer")
    importance: Literal["taylor", "magnitude"] = Field("taylor", description="taylor: |sum(grad x weight)| of the distillation loss; magnitude: weight norm")
    importance_batches: int = Field(16, ge=1, description="Batches the Taylor gradients are accumulated over")
    recover_steps: int = Field(300, ge=0, description="Feature-distillation steps from the teacher after pruning")
    batch_size: int = Field(32, ge=1, description="Inputs per step (importance and recovery)")
    max_length: int = Field(128, ge=8, description="Inputs are truncated to this many tokens")
    lr: float = Field(1e-4, gt=0, description="Peak AdamW learning rate of the recovery")
    seed: int = Field(0, description="Seed of the recovery")
    layers: StrictInt | list[StrictInt] | None = Field(None, description="Whole student layers removed first: a count (those whose skipping raises the distillation loss least) or a list of student layer indices; default none")
    sparsity: SparsityConfig = Field(SparsityConfig(), description="Zeroed weights in the Linears, kept through recovery and exported as zeros; needs sparse kernels on the target to run faster")

    @field_validator("layers")
    @classmethod
    def layers_valid(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 0:
            raise ValueError("must be a count >= 0 or a list of student layer indices")
        if isinstance(value, list) and (any(i < 0 for i in value) or len(set(value)) != len(value)):
            raise ValueError("must list distinct student layer indices >= 0")
        return value


class ExportConfig(Frozen):
    opset: int = Field(17, ge=14, le=21, description="ONNX opset")
    max_abs_diff: float = Field(1e-3, gt=0, description="Largest allowed |onnx - torch| on any embedding value")
    min_cosine: float = Field(0.9999, gt=0, le=1, description="Lowest allowed mean cosine(onnx, torch)")


class FallbackConfig(Frozen):
    enabled: bool = Field(False, description="int8: rank MatMuls by sensitivity and keep the most sensitive in fp32 until the quality check passes")
    metric: Literal["agreement", "retention"] = Field("agreement", description="agreement: mean cosine(int8, fp32) on held-out inputs >= min_agreement; retention: the recipe's gates on the candidate model")
    min_agreement: float = Field(0.99, gt=0, le=1, description="agreement: the lowest accepted mean cosine of the quantized model's outputs to fp32")
    max_fp32: int = Field(4, ge=0, description="Budget: at most this many MatMuls kept in fp32; when spent, the best candidate is kept and the gates decide")
    rows: int = Field(8, ge=1, description="Packed calibration rows each node's sensitivity is measured on")
    sensitivity: Literal["simulated", "onnxruntime"] = Field("simulated", description="simulated: one session, exact int8 arithmetic (VNNI, ARM, TensorRT); onnxruntime: one int8 model per node run by this CPU's kernels (slower; includes AVX2 u8s8 saturation)")


class QuantizeConfig(Frozen):
    dtype: Literal["int8", "fp16"] = Field("int8", description="int8 (CPU, ARM, TensorRT) or fp16 (GPU targets; weights and activations in half precision, io stays fp32)")
    mode: Literal["auto", "dynamic", "static", "qat"] = Field("auto", description="auto: build every mode in `candidates` and keep the fastest on the target that keeps quality; dynamic: activations quantized at run time; static: QDQ with scales calibrated on data.calibration; qat: the torch student fine-tuned with fake int8 in the loop, then exported as QDQ")
    candidates: list[Literal["dynamic", "static", "qat"]] = Field(["dynamic", "static"], min_length=1, description="auto: the modes tried, each built for the target and timed there; qat is tried last, only when no post-training candidate passes the gates")
    max_fidelity_drop: float = Field(0.01, ge=0, le=1, description="auto: a candidate may lose at most this much fidelity (mean cosine to the teacher) against the best candidate")
    per_channel: bool = Field(True, description="One scale per output channel instead of per tensor (keeps ~0.015 more fidelity on MiniLM at no measurable cost)")
    calibration: Literal["minmax", "entropy", "percentile"] = Field("percentile", description="static: how activation ranges are chosen from calibration data (qat starts from percentile)")
    percentile: float = Field(99.99, gt=90, le=100, description="static + percentile, qat: the share of activation values the (initial) range covers")
    flavour: Literal["u8s8", "s8s8-symmetric"] = Field("u8s8", description="static, qat: u8s8 = uint8 activations, int8 weights (x86 VNNI, ARM); s8s8-symmetric = int8, zero point 0 (TensorRT)")
    qat_steps: int = Field(200, ge=1, description="qat: feature-distillation steps from the teacher with fake quantization in the loop")
    qat_lr: float = Field(2e-5, gt=0, description="qat: peak AdamW learning rate (small: the student is already trained; ranges adapt at their own speed)")
    qat_batch_size: int = Field(32, ge=1, description="qat: inputs per step")
    qat_reduce_range: bool = Field(True, description="qat: 7-bit weights (±63), so x86 CPUs without VNNI (AVX2), whose int8 kernels sum product pairs in saturating int16, compute what QAT trained; false for VNNI, ARM or TensorRT only")
    qat_seed: int = Field(0, description="qat: seed of shuffling and initialisation order")
    fallback: FallbackConfig = Field(FallbackConfig(), description="int8: accuracy-aware fallback of the most sensitive MatMuls to fp32")

    @model_validator(mode="after")
    def fallback_needs_int8(self) -> "QuantizeConfig":
        if self.dtype != "int8" and self.fallback.enabled:
            raise ValueError(f"fallback applies to dtype int8, got dtype {self.dtype}; set fallback.enabled: false or dtype: int8")
        if self.mode == "qat" and self.fallback.enabled:
            raise ValueError("fallback keeps single MatMuls in fp32 after post-training quantization; mode qat trains one "
                             "model instead: set fallback.enabled: false or mode: dynamic/static")
        return self


class FuseConfig(Frozen):
    attention: bool = Field(True, description="Fuse each layer's self-attention subgraph into one ONNX Runtime op (layers that don't match are kept, with the reason in meta)")
    op: Literal["Attention", "MultiHeadAttention"] = Field("Attention", description="com.microsoft op: Attention (packed QKV projection; becomes int8 QAttention under dynamic quantization) or MultiHeadAttention (projections stay separate MatMuls)")
    max_abs_diff: float = Field(1e-3, gt=0, description="Largest allowed |fused - unfused| on any embedding value")
    min_cosine: float = Field(0.9999, gt=0, le=1, description="Lowest allowed cosine(fused, unfused) of any embedding")


STAGE_CONFIGS: dict[str, type[Frozen]] = {
    "distill": DistillConfig,
    "prune": PruneConfig,
    "export": ExportConfig,
    "fuse": FuseConfig,
    "quantize": QuantizeConfig,
}
# Stages run in this order whatever the recipe's order; export is inserted if absent.
# fuse is opt-in: exact, but no latency gain measured on CPU yet (README, Recipes).
STAGE_ORDER = ["distill", "prune", "export", "fuse", "quantize"]


class StageEntry(Frozen):
    distill: DistillEntry | None = Field(None, description="Teacher -> smaller student (torch); DistillConfig for embedding and classification, LmDistillConfig for causal-lm")
    prune: PruneConfig | None = Field(None, description="Student -> fewer heads and FFN neurons, then recovery (torch)")
    export: ExportConfig | None = Field(None, description="torch -> validated ONNX (inserted when absent)")
    fuse: FuseConfig | None = Field(None, description="fp32 ONNX -> ONNX with one fused attention op per layer, validated against its input")
    quantize: QuantizeConfig | None = Field(None, description="fp32 ONNX -> int8 (or fp16) ONNX")

    @model_validator(mode="before")
    @classmethod
    def one_stage(cls, value: Any) -> Any:
        if not isinstance(value, dict) or len(value) != 1:
            raise ValueError(f"each stage is a one-key mapping like {{quantize: {{}}}}, got {value!r}")
        name = next(iter(value))
        if name not in STAGE_CONFIGS:
            raise ValueError(f"unknown stage '{name}' (known: {', '.join(STAGE_CONFIGS)})")
        return {name: value[name] or {}}

    @property
    def name(self) -> str:
        return next(k for k in STAGE_CONFIGS if getattr(self, k) is not None)

    @property
    def config(self) -> Frozen:
        return getattr(self, self.name)


class CpuTargetConfig(Frozen):
    threads: int = Field(2, ge=1, description="intra_op_num_threads the build is optimized and benchmarked with")
    optimization: Literal["basic", "extended", "all"] = Field("all", description="ONNX Runtime graph optimization level applied offline")


TARGET_CONFIGS: dict[str, type[Frozen]] = {"cpu": CpuTargetConfig}


class TargetsConfig(Frozen):
    cpu: CpuTargetConfig | None = Field(None, description="ONNX Runtime on x86-64 CPU")

    @model_validator(mode="before")
    @classmethod
    def known(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for name in value:
                if name not in TARGET_CONFIGS:
                    raise ValueError(f"unknown target '{name}' (known: {', '.join(TARGET_CONFIGS)})")
            return {k: (v or {}) for k, v in value.items()}
        return value

    def selected(self) -> dict[str, Frozen]:
        return {k: getattr(self, k) for k in TARGET_CONFIGS if getattr(self, k) is not None}


class GatesConfig(Frozen):
    retention: float | None = Field(None, gt=0, description="Every task metric of the build must keep at least this share of the teacher's")
    fidelity: float | None = Field(None, gt=-1, le=1, description="Mean cosine(build, teacher) on held-out inputs must reach this")


class BenchConfig(Frozen):
    batch: int = Field(1, ge=1, description="Batch for latency")
    seq_len: int = Field(128, ge=8, description="Sequence length for latency and throughput")
    threads: int = Field(2, ge=1, description="intra_op threads")
    warmup: int = Field(10, ge=1, description="Warm-up runs per block")
    runs: int = Field(100, ge=4, description="Timed runs per model, split over rounds")
    rounds: int = Field(10, ge=1, description="Blocks per model, alternated A B A B; the ratio is the median over blocks")
    teacher: bool = Field(True, description="Also measure the teacher (torch eager, ORT fp32 optimized, ORT dynamic int8)")
    rss: bool = Field(True, description="Measure peak RSS in a fresh process per model")


class Recipe(Frozen):
    teacher: TeacherConfig = Field(TeacherConfig(), description="The model to compress")
    task: Literal["embedding", "classification", "causal-lm", "image-classification"] = Field("embedding", description="What the model does; decides losses and metrics: embedding (sentence encoder, Spearman on similarity sets), classification (sequence classifier, accuracy on labelled sets), causal-lm (AutoModelForCausalLM, next-token agreement with the teacher and perplexity on held-out texts), image-classification (CNN or vision transformer, accuracy on labelled image sets)")
    data: DataConfig = Field(DataConfig(), description="Train, held-out and eval inputs")
    stages: list[StageEntry] = Field(
        default_factory=lambda: [StageEntry(distill={}), StageEntry(export={}), StageEntry(quantize={})],
        description="Stages in order: distill, prune, export, fuse, quantize")
    targets: TargetsConfig = Field(TargetsConfig(cpu=CpuTargetConfig()), description="Builds to emit, one per target")
    gates: GatesConfig = Field(GatesConfig(), description="Quality gates; a build that misses one exits 1 but keeps its report")
    bench: BenchConfig = Field(BenchConfig(), description="Benchmark conditions")

    def stage_plan(self) -> list[tuple[str, Frozen]]:
        """Stages in execution order, with export inserted where the graph leaves torch."""
        given = {}
        for entry in self.stages:
            if entry.name in given:
                raise RecipeError(f"stages: '{entry.name}' appears twice; keep one entry per stage")
            given[entry.name] = entry.config
        given.setdefault("export", ExportConfig())
        return [(name, given[name]) for name in STAGE_ORDER if name in given]

    @model_validator(mode="wrap")
    @classmethod
    def task_first(cls, data: Any, handler: Any) -> "Recipe":
        """The task decides how the distill stage and the default eval sets read."""
        task = data.get("task", "embedding") if isinstance(data, dict) else "embedding"
        if task == "causal-lm" and isinstance(data, dict):
            d = data.get("data")
            if d is None or (isinstance(d, dict) and "eval" not in d):
                # the default eval sets are similarity pairs; a causal LM is scored on held-out texts
                data = {**data, "data": {**(d or {}), "eval": []}}
        token = _TASK.set(task if isinstance(task, str) else "embedding")
        try:
            return handler(data)
        finally:
            _TASK.reset(token)

    @model_validator(mode="after")
    def task_fits(self) -> "Recipe":
        """What a task needs from data and stages, checked before any work."""
        from compress.tasks import check_recipe

        check_recipe(self)
        return self


def _where(loc: tuple) -> str:
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in ("function-after", "function-before") or str(item).startswith(("function-", "union[")) \
                or item in _DISTILL_TAGS:
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def explain(exc: ValidationError, origin: str) -> str:
    """One line for the first validation error: where, what, and how to fix."""
    err = exc.errors()[0]
    where = _where(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = where.rsplit(".", 1)[0] if "." in where else "the top level"
        field = where.rsplit(".", 1)[-1]
        return f"{origin}: unknown field '{field}' in {parent}; remove it or check the spelling (compress schema lists the fields)"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    got_s = "" if kind in ("value_error",) or isinstance(got, dict) else f" (got {got!r})"
    return f"{origin}: {where}: {msg}{got_s}"


def parse(data: Any, origin: str = "recipe") -> Recipe:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: the recipe must be a YAML mapping (teacher:, data:, stages:, ...), got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(explain(exc, origin)) from None
    recipe.stage_plan()  # duplicate stages are a recipe error, found now
    return recipe


def load(path: str | Path | None) -> Recipe:
    """Read and validate a recipe; None means the embedded example."""
    if path is None:
        return Recipe()
    import yaml

    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe {p} does not exist; pass -r <compress.yaml> or omit -r for the embedded example")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{p}: malformed YAML{at}: {problem}; fix the syntax") from None
    return parse(data, str(p))


def schema() -> dict:
    return Recipe.model_json_schema()
