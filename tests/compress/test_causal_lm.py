"""Task causal-lm end to end on a tiny GPT-2 teacher (2 blocks, width 32) trained
here on the grammar of test_lm_distill, with its word-level tokenizer: the
recipe's rules, the static calibration of a causal LM, and a `compress build`
to a cpu build whose report has next-token agreement and perplexity retention
after every stage."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compress.errors import RecipeError, SourceError
from tests.compress.test_lm_distill import corpus, word_tokenizer
from tests.stage_helpers import context

ROOT = Path(__file__).resolve().parents[2]
# The benchmark draws token ids above 1000 (BERT-style vocabularies keep special
# tokens below): the embedding table is padded past the tokenizer's 35 words, as
# GPT-2 checkpoints pad theirs to a multiple of 64.
VOCAB = 1024


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fit_to_the_grammar(model, tok, steps: int, out: Path) -> Path:
    """`model` trained `steps` steps on the grammar, saved with the tokenizer in `out`."""
    import torch

    from compress.lm_distill import _pad_right, encode

    rows = encode(corpus(400, seed=0), tok, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    model.train()
    for _ in range(steps):
        ids, mask = _pad_right(rng.sample(rows, 32), tok.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=torch.where(mask.bool(), ids, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A 2-block GPT-2 trained 80 steps on the grammar, saved with its tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = word_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.bos_token_id,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    return fit_to_the_grammar(model, tok, 80, tmp_path_factory.mktemp("tiny-gpt2"))


RECIPE = """
teacher: {{source: "hf:{teacher}", max_length: 64}}
task: causal-lm
data:
  train: {{source: train.txt}}
  heldout_fraction: 0.1
  eval: [{{source: eval.txt}}]
stages:
  - distill: {{layers: [1], losses: [logit, on_policy], lmbda: 0.5, prompt_tokens: 4, max_new_tokens: 8,
               max_steps: 30, batch_size: 16, lr: 3.0e-3, warmup: 0}}
  - quantize: {{mode: dynamic}}
targets: {{cpu: {{}}}}
bench: {{seq_len: 32, runs: 4, rounds: 2, warmup: 1, rss: false}}
"""


def run_build(cwd: Path, *args: str, recipe: str = "compress.yaml", timeout: float = 600) -> subprocess.CompletedProcess:
    # one torch thread (see above); and the compress under test, not whichever one is installed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "compress", "build", "-r", recipe, "--target", "cpu", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def project(teacher_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lm-project")
    (d / "train.txt").write_text("\n".join(corpus(300, seed=21)) + "\n")
    (d / "eval.txt").write_text("\n".join(corpus(40, seed=22)) + "\n")
    (d / "compress.yaml").write_text(RECIPE.format(teacher=teacher_dir))
    res = run_build(d)
    assert res.returncode == 0, res.stderr
    return d


def test_build_reports_agreement_and_perplexity_retention_per_stage(project):
    rep = json.loads((project / "build" / "cpu" / "report.json").read_text())
    assert rep["task"] == "causal-lm"
    assert [s["stage"] for s in rep["stages"]] == ["distill", "export", "quantize", "target cpu"]
    names = {"heldout/agreement", "heldout/perplexity", "eval/agreement", "eval/perplexity"}
    teacher = rep["teacher"]["metrics"]
    assert set(teacher) == names
    assert teacher["heldout/agreement"] == 1.0 and teacher["eval/agreement"] == 1.0
    assert 1.0 < teacher["eval/perplexity"] < 15  # it learned the grammar (35 words)
    for s in rep["stages"]:
        q = s["quality"]
        assert set(q["retention"]) == names
        for name in ("heldout", "eval"):
            assert q["retention"][f"{name}/agreement"] == q["metrics"][f"{name}/agreement"]
            assert q["retention"][f"{name}/perplexity"] == pytest.approx(
                teacher[f"{name}/perplexity"] / q["metrics"][f"{name}/perplexity"])
        assert set(q["fidelity"]) == {"cosine", "agreement"}
        assert q["fidelity"]["agreement"] == q["metrics"]["heldout/agreement"]
    distill, export, quantize, target = (s["quality"] for s in rep["stages"])
    # one block of two, distilled: it copies most of the teacher's next tokens
    assert 0.5 < distill["retention"]["eval/agreement"] < 1.0
    assert distill["retention"]["eval/perplexity"] > 0.5
    # export is exact; int8 moves the numbers a little, the cpu build runs the int8 graph as it is
    assert export["metrics"]["eval/perplexity"] == pytest.approx(distill["metrics"]["eval/perplexity"], rel=1e-4)
    assert abs(quantize["retention"]["eval/agreement"] - export["retention"]["eval/agreement"]) < 0.1
    assert target["metrics"]["eval/perplexity"] == pytest.approx(quantize["metrics"]["eval/perplexity"], rel=1e-3)
    assert rep["summary"]["retention"] == target["retention"]


def test_build_records_distillation_export_and_bench(project):
    rep = json.loads((project / "build" / "cpu" / "report.json").read_text())
    meta = {s["stage"]: s["meta"] for s in rep["stages"]}
    assert meta["distill"]["losses"] == ["logit", "on_policy"] and meta["distill"]["layers"] == [1]
    assert 0 < meta["distill"]["on_policy_steps"] < 30 and meta["distill"]["generated_tokens"] > 0
    # the teacher's top-64 logits on the train texts went to the cache once; on-policy batches ran it live
    out = meta["distill"]["teacher_outputs"]
    assert out["k"] == 64 and out["cached"] is False and out["bytes"] > 0
    assert (project / ".compress" / "cache" / "teacher-outputs" / out["key"] / "meta.json").is_file()
    assert meta["distill"]["teacher_forwards"] > meta["distill"]["on_policy_steps"]
    assert meta["export"]["outputs"] == {"logits": ["batch", "sequence", VOCAB]}
    assert meta["export"]["validation"]["texts"]["max_abs_diff"] < 1e-3
    assert meta["quantize"]["precision"] == "int8" and meta["target cpu"]["graph"]["int8_kernels"] > 0
    assert rep["final"]["params"] < rep["teacher"]["params"]
    # one block of two; the LM head (32 x 1024 per position) is in both
    compute = rep["summary"]["compute"]
    assert compute["at"] == {"batch": 1, "seq_len": 32}
    head, block = 2 * 32 * 32 * VOCAB, 2 * 32 * (32 * 96 + 32 * 32 + 2 * 32 * 64) + 2 * 2 * 32 * 32 * 32
    assert compute["teacher"]["flops"] == head + 2 * block and compute["student"]["flops"] == head + block
    bench = rep["bench"]
    assert bench["conditions"]["seq_len"] == 32 and bench["conditions"]["batch"] == 1
    measured = set(bench["models"])
    assert {"student", "student-fp32", "teacher-torch-fp32", "teacher-ort-int8"} <= measured
    # every teacher alternative is either measured or skipped with its reason
    for name in ("teacher-ort-fp32", "teacher-ort-int8"):
        assert name in measured or bench["skipped"][name]
    md = (project / "build" / "cpu" / "report.md").read_text()
    assert "heldout/perplexity" in md and "next token" in md


def test_unchanged_rebuild_does_no_stage_work(project):
    res = run_build(project)
    assert res.returncode == 0, res.stderr
    assert "no stage work" in res.stderr + res.stdout


def test_quantize_mode_auto_measures_dynamic_and_static_on_the_target(project):
    """Same distill and export (from the cache), then quantize mode auto: both
    post-training modes built, scored by next-token fidelity and timed on cpu."""
    recipe = (project / "compress.yaml").read_text().replace("- quantize: {mode: dynamic}", "- quantize: {}")
    (project / "auto.yaml").write_text(recipe)
    res = run_build(project, "--no-bench", "--out", "build-auto", recipe="auto.yaml")
    assert res.returncode == 0, res.stderr
    assert "distill: cached" in res.stderr + res.stdout
    rep = json.loads((project / "build-auto" / "cpu" / "report.json").read_text())
    decision = next(s["decision"] for s in rep["stages"] if s["stage"] == "quantize")
    assert set(decision["candidates"]) == {"dynamic", "static"} and decision["chosen"] in decision["candidates"]
    for c in decision["candidates"].values():
        assert 0.5 < c["fidelity"] <= 1.0 and c["p50_ms"] > 0
    assert rep["stages"][-1]["quality"]["retention"]["heldout/agreement"] > 0.5


def test_nproc_2_distils_a_causal_lm_like_one_process(project):
    """`--nproc 2` with batch_size 8 against the project's one-process build with
    batch_size 16 (the same global batch; 30 steps: one epoch and most of a
    second): every text once per epoch, on one rank, the same texts in the
    second epoch's part; the same steps and on-policy steps; the teacher's top-k
    logits computed sharded into the same entry; the same retention."""
    recipe = (project / "compress.yaml").read_text()
    assert "batch_size: 16" in recipe
    (project / "two.yaml").write_text(recipe.replace("batch_size: 16", "batch_size: 8"))
    res = run_build(project, "--nproc", "2", "-o", "b2", "--cache", "c2", "--no-bench", recipe="two.yaml")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 processes" in res.stderr
    one = json.loads((project / "build" / "cpu" / "report.json").read_text())
    two = json.loads((project / "b2" / "cpu" / "report.json").read_text())
    m1, m2 = one["stages"][0]["meta"], two["stages"][0]["meta"]
    d1, d2 = m1["data"], m2["data"]
    assert (d1["ranks"], d2["ranks"]) == (1, 2) and d1["inputs"] == d2["inputs"] > 200
    assert m2["steps"] == m1["steps"] == 30 and m2["on_policy_steps"] == m1["on_policy_steps"] > 0
    assert len(d1["epochs"]) == len(d2["epochs"]) == 2
    for e1, e2 in zip(d1["epochs"], d2["epochs"]):
        assert e2["seen"] == e2["distinct"] == e1["seen"] == e1["distinct"]  # each text once, on one rank
        assert abs(e2["per_rank"][0] - e2["per_rank"][1]) <= 8  # within one batch's share
    assert d2["epochs"][0]["seen"] == d2["inputs"]  # the first epoch is complete (30 steps end in the second)
    # one shared top-k entry, each rank its groups: as many teacher forwards as one process, the same bytes;
    # on-policy steps score samples with the live teacher on both ranks
    (e1,), (e2,) = ([p.parent for p in (project / c / "teacher-outputs").glob("*/meta.json")]
                    for c in (".compress/cache", "c2"))
    meta1, meta2 = (json.loads((e / "meta.json").read_text()) for e in (e1, e2))
    assert meta2["ranks"] == 2 and meta2["forwards"] == meta1["forwards"] and e1.name == e2.name
    assert m2["teacher_outputs"]["cached"] is False and m2["teacher_outputs"]["key"] == e2.name
    assert (e2 / "logits.values.npy").read_bytes() == (e1 / "logits.values.npy").read_bytes()
    assert (e2 / "logits.indices.npy").read_bytes() == (e1 / "logits.indices.npy").read_bytes()
    assert m2["teacher_forwards"] == m1["teacher_forwards"] + m1["on_policy_steps"]
    assert m2["generated_tokens"] > 0
    # it learned as much as one process (rank 0's loss is on its half of each batch, its own samples)
    assert m2["loss_last"] < 0.6 * m2["loss_first"]
    assert m2["loss_last"] == pytest.approx(m1["loss_last"], rel=0.35)
    for q1, q2 in zip([s["quality"] for s in one["stages"]], [s["quality"] for s in two["stages"]]):
        for name in ("heldout/agreement", "eval/agreement"):
            assert q2["retention"][name] == pytest.approx(q1["retention"][name], abs=0.05)
        assert q2["retention"]["eval/perplexity"] == pytest.approx(q1["retention"]["eval/perplexity"], rel=0.1)


T = {"source": "hf:/nonexistent"}


@pytest.mark.parametrize("recipe, message", [
    ({"task": "causal-lm", "teacher": {"source": "onnx:m.onnx"}}, "teacher.source: task causal-lm distils a torch model"),
    ({"task": "causal-lm"}, "teacher.source: example:minilm is a BERT encoder"),
    ({"task": "causal-lm", "teacher": T, "stages": [{"distill": {"losses": ["feature"]}}]},
     "recipe: stages[0].distill.losses: feature matches an encoder's hidden states"),
    ({"task": "causal-lm", "teacher": T, "stages": [{"distill": {"student": {"layers": [0]}}}]},
     "recipe: stages[0].distill: task causal-lm picks the student's blocks with layers:"),
    ({"task": "causal-lm", "teacher": T, "stages": [{"distill": {"lmbda": 2}}]},
     "recipe: stages[0].distill.lmbda: Input should be less than or equal to 1"),
    ({"stages": [{"distill": {"losses": ["on_policy"]}}]},
     "recipe: stages[0].distill.losses: on_policy distils a causal language model; set task: causal-lm"),
    ({"task": "causal-lm", "teacher": T, "stages": [{"distill": {}}, {"prune": {}}]},
     "stages.prune: task causal-lm is not supported by prune yet"),
    ({"task": "causal-lm", "teacher": T, "stages": [{"fuse": {}}]}, "stages.fuse: task causal-lm is not supported"),
    ({"task": "causal-lm", "teacher": T, "stages": [{"quantize": {"mode": "qat"}}]}, "stages.quantize: qat"),
    ({"task": "causal-lm", "teacher": T, "stages": [{"quantize": {"candidates": ["static", "qat"]}}]},
     "stages.quantize: qat"),
    ({"task": "causal-lm", "teacher": T, "stages": [{"quantize": {"fallback": {"enabled": True}}}]},
     "stages.quantize.fallback"),
    ({"task": "causal-lm", "teacher": T, "data": {"eval": [{"source": "example:lee-similarity"}]}},
     "data.eval[0]: example:lee-similarity is a similarity set"),
])
def test_recipe_errors(recipe, message):
    from compress.recipe import parse

    with pytest.raises(RecipeError) as exc:
        parse(recipe)
    assert str(exc.value).startswith(message)
    assert "\n" not in str(exc.value)


def test_on_policy_and_sampling_settings_come_from_the_recipe():
    from compress.recipe import DistillConfig, LmDistillConfig, parse, schema

    r = parse({"task": "causal-lm", "teacher": T, "stages": [{"distill": {
        "layers": [0, 2], "losses": ["on_policy"], "lmbda": 0.25, "beta": 1.0, "sample_temperature": 0.7,
        "top_p": 0.9, "max_new_tokens": 12}}]})
    cfg = r.stage_plan()[0][1]
    assert isinstance(cfg, LmDistillConfig)
    assert (cfg.losses, cfg.lmbda, cfg.beta, cfg.sample_temperature, cfg.top_p, cfg.max_new_tokens, cfg.layers) == \
        (["on_policy"], 0.25, 1.0, 0.7, 0.9, 12, [0, 2])
    # no data.eval: the held-out split is scored (the default similarity sets are for encoders)
    assert r.data.eval == []
    # the recipe a report records parses back to the same recipe
    assert parse(r.model_dump(mode="json", exclude_none=True)) == r
    # an encoder task still reads distill as before
    assert isinstance(parse({"stages": [{"distill": {}}]}).stage_plan()[0][1], DistillConfig)
    refs = json.dumps(schema()["$defs"]["StageEntry"]["properties"]["distill"])
    assert "LmDistillConfig" in refs and "DistillConfig" in refs


def test_bert_teacher_for_causal_lm_exits_2_before_work(tiny_teacher, tmp_path):
    (tmp_path / "train.txt").write_text("\n".join(corpus(50, seed=1)) + "\n")
    (tmp_path / "compress.yaml").write_text(f'teacher: {{source: "hf:{tiny_teacher}"}}\ntask: causal-lm\n'
                                            "data: {train: {source: train.txt}}\n")
    res = run_build(tmp_path, timeout=120)
    assert res.returncode == 2
    assert "is a BertModel, not a causal language model; task causal-lm needs an AutoModelForCausalLM" in res.stderr
    assert not (tmp_path / ".compress").exists()


def test_static_quantization_calibrates_a_causal_lm(teacher_dir, tmp_path):
    """Calibration rows of a tokenizer without [CLS]/[SEP] (BOS ... EOS ...), and
    an int8 QDQ graph that predicts nearly as well as the fp32 export."""
    from compress.artifact import Artifact, digest_files
    from compress.lm_eval import OnnxLm, score
    from compress.recipe import ExportConfig, QuantizeConfig
    from compress import export as ex, quantize as q

    texts = corpus(64, seed=5)
    src = Artifact(path=teacher_dir, kind="torch", digest=digest_files(teacher_dir), meta={"task": "causal-lm"})
    fp32 = ex.export(src, ExportConfig(), context(tmp_path / "export", texts, texts[:8]))
    ctx = context(tmp_path / "static", texts, texts[:8])
    ctx.calibration_texts = texts
    int8 = q.quantize(fp32, QuantizeConfig(mode="static"), ctx)
    assert int8.meta["quantization"]["calibration_rows"] >= 1
    ops = {n.op_type for n in __import__("onnx").load(str(int8.model_file)).graph.node}
    assert "QuantizeLinear" in ops
    a = score(OnnxLm(fp32.model_file, fp32.path, 64), texts[:16])
    b = score(OnnxLm(int8.model_file, int8.path, 64), texts[:16])
    assert a["argmax"].shape == b["argmax"].shape
    # the grammar leaves near ties between words (cat or dog): argmax flips more readily than the loss moves
    # (measured: perplexity 7.7 -> 8.3, agreement 0.76)
    assert np.exp(b["nll"] / b["count"]) < 1.15 * np.exp(a["nll"] / a["count"])
    assert (a["argmax"] == b["argmax"]).mean() > 0.6


def test_causal_lm_teacher_check_names_the_fix(tiny_teacher):
    from compress.lm_distill import check_teacher

    with pytest.raises(SourceError, match="AutoModelForCausalLM"):
        check_teacher(f"hf:{tiny_teacher}")


@pytest.mark.parametrize("config, message", [
    ({"architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True},
     "is a T5ForConditionalGeneration, not a causal language model; task causal-lm needs an AutoModelForCausalLM "
     "directory saved with save_pretrained (tested: GPT-2, Llama, Qwen2, GPT-NeoX, OPT)"),
    # a causal-LM head on an encoder-decoder config
    ({"architectures": ["SomeSeq2SeqForCausalLM"], "is_encoder_decoder": True},
     "is an encoder-decoder (SomeSeq2SeqForCausalLM); task causal-lm distils decoder-only AutoModelForCausalLM "
     "models whose blocks are one nn.ModuleList of config.num_hidden_layers modules (tested: GPT-2, Llama, Qwen2, "
     "GPT-NeoX, OPT)"),
])
def test_an_encoder_decoder_teacher_is_refused_before_any_work(config, message, tmp_path):
    from compress.lm_distill import check_teacher

    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")  # never read: the check reads config.json only
    with pytest.raises(SourceError) as exc:
        check_teacher(f"hf:{tmp_path}")
    assert str(exc.value) == f"teacher.source: {tmp_path} {message}"


def test_fidelity_cosine_is_one_for_the_same_distribution_and_lower_otherwise():
    from compress.lm_eval import fidelity

    ids = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    p = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]], np.float32)
    same = fidelity({"heldout/argmax": ids[:, 0], "heldout/topk_ids": ids, "heldout/topk_probs": p},
                    {"heldout/argmax": ids[:, 0], "heldout/topk_ids": ids, "heldout/topk_probs": p})
    assert same == {"cosine": pytest.approx(1.0), "agreement": 1.0}
    swapped = ids[:, [1, 0, 2]]  # the same tokens, the two most likely swapped
    other = fidelity({"heldout/argmax": swapped[:, 0], "heldout/topk_ids": swapped, "heldout/topk_probs": p},
                     {"heldout/argmax": ids[:, 0], "heldout/topk_ids": ids, "heldout/topk_probs": p})
    assert other["agreement"] == 0.0 and 0 < other["cosine"] < 0.9


def test_a_teacher_alternative_that_cannot_be_made_is_skipped_with_its_reason(teacher_dir, tmp_path, monkeypatch):
    from compress import pipeline
    from compress.artifact import Artifact, digest_files
    from compress.pipeline import Builder, BuildOptions, Inputs
    from compress.recipe import parse

    recipe = parse({"task": "causal-lm", "teacher": {"source": f"hf:{teacher_dir}", "max_length": 64}})
    builder = Builder(recipe, BuildOptions(targets=["cpu"], cache_root=tmp_path / "cache", progress=False))
    texts = corpus(20, seed=3)
    builder.inputs = Inputs(train=texts, heldout=texts, eval_sets=[])
    builder.teacher = Artifact(path=teacher_dir, kind="torch", digest=digest_files(teacher_dir),
                               meta={"task": "causal-lm"})

    def no_optimizer(src, cfg, ctx):
        raise ValueError("model type 'gpt2' is not supported here")

    monkeypatch.setattr(pipeline, "optimize_reference", no_optimizer)
    models = builder.reference_models(threads=1)
    assert [(m.name, m.kind) for m in models] == [("teacher-torch-fp32", "torch-hf-lm"), ("teacher-ort-int8", "onnx")]
    assert builder.skipped_references == {"teacher-ort-fp32": "ValueError: model type 'gpt2' is not supported here"}


def test_each_stage_runs_a_llama_teacher(tmp_path):
    """The stages of a causal-lm build on a Llama teacher (rotary positions,
    grouped-query attention, RMSNorm, gated MLP), run one by one rather than as a
    second `compress build` (the GPT-2 build above costs over a minute): distill
    (logit + on-policy), export (validated against torch by the stage), dynamic
    int8, and the build's eval of each artifact against the teacher. (A Qwen2
    teacher would load the grammar's word-level tokenizer as Qwen2Tokenizer,
    which transformers imposes on that model type: see test_artifact.py.)"""
    import onnx
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress import export as ex, quantize as q
    from compress.artifact import Artifact, digest_files
    from compress.lm_distill import distill, load_causal_lm
    from compress.lm_eval import evaluate, open_lm
    from compress.recipe import ExportConfig, LmDistillConfig, QuantizeConfig

    torch.manual_seed(0)
    tok = word_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id))
    teacher_dir = fit_to_the_grammar(model, tok, 40, tmp_path / "teacher")
    teacher = Artifact(path=teacher_dir, kind="torch", digest=digest_files(teacher_dir), meta={"task": "causal-lm"})
    train, held = corpus(200, seed=21), corpus(40, seed=22)

    cfg = LmDistillConfig(layers=[0, 2], losses=["logit", "on_policy"], lmbda=0.5, prompt_tokens=4, max_new_tokens=8,
                          max_steps=12, batch_size=16, lr=3e-3, warmup=0)
    student = distill(teacher, cfg, context(tmp_path / "distill", train))
    assert student.meta["layers"] == [0, 2] and 0 < student.meta["on_policy_steps"] < 12
    assert student.meta["loss_last"] < student.meta["loss_first"]
    assert [b.self_attn.layer_idx for b in load_causal_lm(student.path).model.layers] == [0, 1]

    onnx_fp32 = ex.export(student, ExportConfig(), context(tmp_path / "export", train, held[:8]))
    assert onnx_fp32.meta["model_type"] == "llama"
    assert onnx_fp32.meta["validation"]["texts"]["max_abs_diff"] < 1e-4
    int8 = q.quantize(onnx_fp32, QuantizeConfig(mode="dynamic"), context(tmp_path / "quantize", train))
    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(int8.model_file)).graph.node}

    ref_metrics, ref = evaluate(open_lm(teacher, 64, threads=1), [], held)
    assert ref_metrics["heldout/agreement"] == 1.0 and ref_metrics["heldout/perplexity"] < 15
    scored = {name: evaluate(open_lm(art, 64, threads=1), [], held, ref)[0]
              for name, art in (("distill", student), ("export", onnx_fp32), ("quantize", int8))}
    # measured: teacher perplexity 5.41; student 5.40, agreement 0.91; int8 5.59, agreement 0.70 (the grammar's
    # near ties, cat or dog, flip their argmax long before the loss moves)
    assert scored["distill"]["heldout/agreement"] > 0.8
    assert scored["distill"]["heldout/perplexity"] < 1.1 * ref_metrics["heldout/perplexity"]
    assert scored["export"]["heldout/perplexity"] == pytest.approx(scored["distill"]["heldout/perplexity"], rel=1e-4)
    assert scored["export"]["heldout/agreement"] == scored["distill"]["heldout/agreement"]
    assert scored["quantize"]["heldout/perplexity"] < 1.1 * scored["export"]["heldout/perplexity"]
    assert scored["quantize"]["heldout/agreement"] > 0.5
