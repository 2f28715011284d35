"""copy_tokenizer: a tokenizer copied beside an ONNX model (no config.json there)
loads as it did beside its torch model."""

from __future__ import annotations

import pytest

from compress.artifact import copy_tokenizer
from tests.compress.test_lm_distill import word_tokenizer


@pytest.mark.parametrize("config, loads_as", [
    # transformers overrides the class tokenizer_config.json names for some model types, Qwen2 among them
    ("Qwen2Config", "Qwen2Tokenizer"),
    ("LlamaConfig", "TokenizersBackend"),  # the file's own class: copied unchanged
])
def test_a_copied_tokenizer_loads_as_beside_its_model(config, loads_as, tmp_path):
    import transformers
    from transformers import AutoTokenizer

    src, dst = tmp_path / "torch", tmp_path / "onnx"
    dst.mkdir()
    getattr(transformers, config)(vocab_size=35).save_pretrained(src)
    word_tokenizer().save_pretrained(src)
    copied = copy_tokenizer(src, dst)
    assert "tokenizer_config.json" in copied and not (dst / "config.json").exists()
    beside, alone = AutoTokenizer.from_pretrained(str(src)), AutoTokenizer.from_pretrained(str(dst))
    assert type(beside).__name__ == type(alone).__name__ == loads_as
    texts = ["the cat sees the dog .", "the big cats see the red dogs today ."]
    assert beside(texts)["input_ids"] == alone(texts)["input_ids"]
    if loads_as == "TokenizersBackend":
        assert (dst / "tokenizer_config.json").read_bytes() == (src / "tokenizer_config.json").read_bytes()
