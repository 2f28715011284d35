import json

import pytest

from compress import data
from compress.errors import SourceError


def test_text_file_one_input_per_line(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("first line\n\n  second line  \nthird\n")
    assert data.load_texts(str(p)) == ["first line", "second line", "third"]
    assert data.load_texts(str(p), samples=2) == ["first line", "second line"]


def test_jsonl_with_field(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"text": "a b", "id": 1}) + "\n" + json.dumps({"text": "c d"}) + "\n")
    assert data.load_texts(str(p), field="text") == ["a b", "c d"]
    with pytest.raises(SourceError, match="needs 'field'"):
        data.load_texts(str(p))
    with pytest.raises(SourceError, match="line 1 has no string field 'body'"):
        data.load_texts(str(p), field="body")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    p = tmp_path / "empty.txt"
    p.write_text(content)
    with pytest.raises(SourceError, match="has no inputs"):
        data.load_texts(str(p), where="data.train")


def test_missing_file(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        data.load_texts(str(tmp_path / "nope.txt"))


def test_heldout_split_is_disjoint_stable_and_order_free():
    texts = [f"sentence number {i}" for i in range(2000)]
    train, held = data.split_heldout(texts, 0.05)
    assert not set(train) & set(held)
    assert 50 < len(held) < 150
    train2, held2 = data.split_heldout(list(reversed(texts)), 0.05)
    assert set(held2) == set(held)


def test_example_eval_sets():
    lee = data.load_eval("example:lee-similarity")
    assert len(lee.texts) == 50 and len(lee.pairs) == 50 * 49 // 2
    ws = data.load_eval("example:wordsim353")
    assert len(ws.pairs) == 353
    sl = data.load_eval("example:simlex999")
    assert len(sl.pairs) == 999
    with pytest.raises(SourceError, match="known: example:lee-similarity"):
        data.load_eval("example:nope")


def test_example_corpus_is_large_and_varied():
    texts = data.load_texts("example:corpus")
    assert len(texts) > 15000
    assert len(set(texts)) > 0.95 * len(texts)


def test_extra_train_is_appended_before_the_heldout_split(tiny_project, monkeypatch):
    from compress import recipe as recipes
    from compress.pipeline import load_inputs
    from tests.conftest import make_texts

    monkeypatch.chdir(tiny_project)
    extra = [t + " extra" for t in make_texts(200, seed=42)]
    (tiny_project / "extra.txt").write_text("\n".join(extra) + "\n")
    base = recipes.load(tiny_project / "compress.yaml")
    more = recipes.parse({**base.model_dump(mode="json", exclude_unset=True),
                          "data": {**base.data.model_dump(mode="json", exclude_unset=True),
                                   "extra_train": [{"source": "extra.txt", "samples": 150}]}})
    a, b = load_inputs(base), load_inputs(more)
    assert set(b.train + b.heldout) - set(a.train + a.heldout) == set(extra[:150])
    assert set(a.train) <= set(b.train)  # the split is by hash: the first inputs stay where they were
    assert any(t in b.heldout for t in extra[:150]) and any(t in b.train for t in extra[:150])


def test_corpus_words_are_the_frequent_words_most_frequent_first():
    from compress.data import corpus_words

    texts = ["The cat sat. The cat ran!", "A cat and THE dog", "the dog, the end", "ox ox ox"]
    assert corpus_words(texts, top=10, min_count=2) == ("the", "cat", "dog")  # "ox" is too short, "and" too rare
    assert corpus_words(texts, top=1, min_count=1) == ("the",)
