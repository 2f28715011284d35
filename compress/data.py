"""Inputs: train/held-out texts and eval sets, from files or the embedded examples.

The example data ships inside PyPI packages (gensim's test data), never in this
repo: `example:corpus` is sentences from Wikipedia articles, Lee's news corpus
and movie-review snippets; the eval sets are Lee document similarity,
WordSim353 and SimLex-999.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from compress.errors import SourceError

EXAMPLE_TEXT = ("corpus", "wiki", "lee-background", "polarity", "words")
EXAMPLE_EVAL = ("lee-similarity", "wordsim353", "simlex999")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def _gensim_path(name: str) -> Path:
    try:
        from gensim.test.utils import datapath
    except ImportError:
        raise SourceError("the example data needs gensim; install it with: pip install '.[example]'") from None
    return Path(datapath(name))


def split_sentences(text: str, min_chars: int = 20, max_chars: int = 400) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if min_chars <= len(s.strip()) <= max_chars]


def _wiki_sentences() -> list[str]:
    import bz2

    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = _gensim_path("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    out = []
    with bz2.open(path) as f:
        for _title, text, _pageid in extract_pages(f):
            for para in filter_wiki(text).split("\n"):
                para = para.strip()
                # Tables, lists and headings are markup left-overs, not prose.
                if len(para) < 80 or para.startswith(("|", "!", "*", "{", "=", "#", ":")):
                    continue
                out.extend(split_sentences(para, min_chars=40))
    return out


def _lee_background() -> list[str]:
    text = _gensim_path("lee_background.cor").read_text(encoding="utf-8", errors="replace")
    return [s for doc in text.splitlines() for s in split_sentences(doc)]


def _polarity() -> list[str]:
    lines = _gensim_path("pang_lee_polarity.cor").read_text(encoding="latin-1").splitlines()
    return [re.sub(r"^__label__\w+\s+", "", line).strip() for line in lines if line.strip()]


def corpus_words(texts, top: int = 6000, min_count: int = 3) -> tuple[str, ...]:
    """The `top` most frequent lower-case words (3+ letters, seen `min_count`+
    times) of `texts`, most frequent first: single-word inputs, which sentences
    alone teach a small student poorly (word-similarity sets embed words alone)."""
    from collections import Counter

    counts = Counter(w for t in texts for w in re.findall(r"[a-z]+", t.lower()) if len(w) >= 3)
    return tuple(w for w, n in counts.most_common() if n >= min_count)[:top]


@lru_cache(maxsize=None)
def example_texts(name: str) -> tuple[str, ...]:
    if name == "wiki":
        return tuple(_wiki_sentences())
    if name == "lee-background":
        return tuple(_lee_background())
    if name == "polarity":
        return tuple(_polarity())
    if name == "corpus":
        return example_texts("wiki") + example_texts("lee-background") + example_texts("polarity")
    if name == "words":
        return corpus_words(example_texts("corpus"))
    raise SourceError(f"unknown example text source 'example:{name}' (known: "
                      + ", ".join(f"example:{n}" for n in EXAMPLE_TEXT) + ")")


def load_texts(source: str, field: str | None = None, samples: int | None = None, where: str = "data") -> list[str]:
    """Texts from example:<name>, a .txt file (one per line) or a .jsonl file."""
    if source.startswith("example:"):
        texts = list(example_texts(source.removeprefix("example:")))
    else:
        path = Path(source)
        if not path.is_file():
            raise SourceError(f"{where}: {path} does not exist; give an existing .txt or .jsonl file or an example:<name> source")
        if path.suffix == ".jsonl":
            texts = _read_jsonl(path, field, where)
        else:
            if field is not None:
                raise SourceError(f"{where}: 'field' applies to .jsonl files, but {path} is read as plain text; drop field or use .jsonl")
            texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise SourceError(f"{where}: {path} has no inputs; put one input per line (or one JSON object per line for .jsonl)")
    return texts[:samples] if samples else texts


def extra_texts(d) -> list[str]:
    """The inputs of data.extra_train, in order (recipe.DataConfig)."""
    return [t for i, s in enumerate(d.extra_train)
            for t in load_texts(s.source, s.field, s.samples, where=f"data.extra_train[{i}]")]


def jsonl_rows(path: Path, where: str):
    """(line number, parsed object) of each non-blank line of a JSONL file."""
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as exc:
            raise SourceError(f"{where}: {path} line {i} is not JSON ({exc.msg}); write one JSON object per line") from None


def _read_jsonl(path: Path, field: str | None, where: str) -> list[str]:
    if not field:
        raise SourceError(f"{where}: {path} is JSONL, so it needs 'field' naming the key that holds the text")
    texts = []
    for i, row in jsonl_rows(path, where):
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise SourceError(f"{where}: {path} line {i} has no string field '{field}'; set field to the key holding the text")
        if row[field].strip():
            texts.append(row[field].strip())
    return texts


def split_heldout(texts: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, heldout), split by a hash of each text so the split is stable
    whatever the order, and a repeated text never lands on both sides."""
    buckets = 10_000
    cut = int(fraction * buckets)
    train, held = [], []
    seen = set()
    for t in texts:
        if t in seen:
            continue
        seen.add(t)
        h = int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "big") % buckets
        (held if h < cut else train).append(t)
    return train, held


def texts_digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class EvalSet:
    """A similarity eval: score pairs of texts; metric = Spearman(cosine, human)."""

    name: str
    texts: tuple[str, ...]          # every text to embed, once
    pairs: tuple[tuple[int, int], ...]
    human: tuple[float, ...]
    metric: str = "spearman"

    def digest(self) -> str:
        return texts_digest([self.name, *self.texts, json.dumps(self.pairs), json.dumps(self.human)])


@dataclass(frozen=True)
class TextSet:
    """A causal-lm eval: plain texts; metrics = next-token agreement with the teacher and perplexity."""

    name: str
    texts: tuple[str, ...]

    def digest(self) -> str:
        return texts_digest([self.name, *self.texts])


def load_text_eval(source: str, field: str | None, samples: int | None, where: str) -> TextSet:
    name = source.removeprefix("example:") if source.startswith("example:") else Path(source).stem
    return TextSet(name, tuple(load_texts(source, field, samples, where=where)))


def _word_pairs(name: str, filename: str) -> EvalSet:
    words: dict[str, int] = {}
    pairs, human = [], []
    for line in _gensim_path(filename).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        a, b, score = line.split("\t")[:3]
        for w in (a, b):
            words.setdefault(w, len(words))
        pairs.append((words[a], words[b]))
        human.append(float(score))
    return EvalSet(name, tuple(words), tuple(pairs), tuple(human))


def _lee_similarity() -> EvalSet:
    docs = [d.strip() for d in _gensim_path("lee.cor").read_text(encoding="utf-8", errors="replace").splitlines() if d.strip()]
    rows = [[float(x) for x in line.split()] for line in
            _gensim_path("similarities0-1.txt").read_text().splitlines() if line.strip()]
    n = len(docs)
    if len(rows) != n:
        raise SourceError(f"example:lee-similarity: {len(rows)} similarity rows for {n} documents; reinstall gensim")
    pairs, human = [], []
    for i in range(n):
        for j in range(i + 1, n):  # the matrix is upper triangular
            pairs.append((i, j))
            human.append(rows[i][j])
    return EvalSet("lee-similarity", tuple(docs), tuple(pairs), tuple(human))


def load_eval(source: str, field: str | None = None, samples: int | None = None) -> EvalSet:
    """An eval set: example:<name>, or a .jsonl of {text1, text2, score} pairs
    (`field` renames the prefix: field 'sentence' reads sentence1/sentence2)."""
    if source == "example:lee-similarity":
        return _lee_similarity()
    if source == "example:wordsim353":
        return _word_pairs("wordsim353", "wordsim353.tsv")
    if source == "example:simlex999":
        return _word_pairs("simlex999", "simlex999.txt")
    if source.startswith("example:"):
        raise SourceError(f"unknown example eval set '{source}' (known: " + ", ".join(f"example:{n}" for n in EXAMPLE_EVAL) + ")")
    path = Path(source)
    if not path.is_file() or path.suffix != ".jsonl":
        raise SourceError(f"data.eval: {path} is not an existing .jsonl file of {{\"text1\", \"text2\", \"score\"}} rows; fix the path")
    prefix = field or "text"
    texts: dict[str, int] = {}
    pairs, human = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            a, b, score = row[f"{prefix}1"], row[f"{prefix}2"], float(row["score"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise SourceError(f"data.eval: {path} line {i} needs {prefix}1, {prefix}2 and a numeric score") from None
        for t in (a, b):
            texts.setdefault(t, len(texts))
        pairs.append((texts[a], texts[b]))
        human.append(score)
        if samples and len(pairs) >= samples:
            break
    if len(pairs) < 3:
        raise SourceError(f"data.eval: {path} has {len(pairs)} pairs; a rank correlation needs at least 3")
    return EvalSet(path.stem, tuple(texts), tuple(pairs), tuple(human))


# -- labelled inputs (task classification) ------------------------------------

POLARITY_TEST_FRACTION = 0.25


@dataclass(frozen=True)
class LabelledSet:
    """A classification eval: texts with their class ids; metric = accuracy."""

    name: str
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    metric: str = "accuracy"

    def digest(self) -> str:
        return texts_digest([self.name, *self.texts, json.dumps(self.labels)])


def polarity_rows(part: str = "all") -> list[tuple[str, str]]:
    """gensim's pang_lee_polarity.cor: 200 movie-review snippets, `__label__neg|pos text`.
    part train/test: a stable split by hash (25% test), so the example teacher is
    fine-tuned on train and scored on test."""
    rows = []
    for line in _gensim_path("pang_lee_polarity.cor").read_text(encoding="latin-1").splitlines():
        m = re.match(r"^__label__(\w+)\s+(.*)$", line.strip())
        if m and m.group(2).strip():
            rows.append((m.group(2).strip(), m.group(1)))
    if part == "all":
        return rows
    cut = int(POLARITY_TEST_FRACTION * 10_000)
    # Salted: with split_heldout's own hash every train text would fall outside its held-out share.
    test = {t for t, _ in rows
            if int.from_bytes(hashlib.sha256(b"polarity-test\0" + t.encode()).digest()[:4], "big") % 10_000 < cut}
    return [r for r in rows if (r[0] in test) == (part == "test")]


def _label_id(value, label2id: dict[str, int], num_labels: int, where: str) -> int:
    if isinstance(value, bool):
        value = None  # JSON true/false is not a class
    elif isinstance(value, str) and value.strip() in label2id:
        return label2id[value.strip()]
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, int) and 0 <= value < num_labels:
        return value
    names = ", ".join(label2id) or "none"
    raise SourceError(f"{where}: label {value!r} is not a class of the teacher (names: {names}; ids 0..{num_labels - 1}); "
                      "fix the label, or the teacher's config.json label2id")


def load_labelled(source: str, field: str | None, label_field: str | None, samples: int | None,
                  label2id: dict[str, int], num_labels: int, where: str) -> tuple[list[str], list[int] | None]:
    """(texts, labels or None) from example:polarity[-train|-test], a .tsv/.csv of
    text<TAB>label (text,label), a .jsonl with field (+ label_field), or a .txt (no labels)."""
    import csv

    if source in ("example:polarity", "example:polarity-train", "example:polarity-test"):
        part = {"example:polarity": "all", "example:polarity-train": "train", "example:polarity-test": "test"}[source]
        rows = polarity_rows(part)
        texts = [t for t, _ in rows]
        labels = [_label_id(l, label2id, num_labels, f"{where}: {source}") for _, l in rows]
    elif source.startswith("example:") or Path(source).suffix not in (".tsv", ".csv", ".jsonl"):
        return load_texts(source, field, samples, where), None
    else:
        path = Path(source)
        if not path.is_file():
            raise SourceError(f"{where}: {path} does not exist; give an existing .tsv, .csv or .jsonl file")
        texts, labels = [], []
        if path.suffix == ".jsonl":
            if label_field is None:  # unlabelled inputs: fine for distillation
                return load_texts(source, field, samples, where), None
            if not field:
                raise SourceError(f"{where}: {path} is JSONL, so it needs 'field' naming the key that holds the text")
            for i, row in jsonl_rows(path, where):
                if not isinstance(row, dict) or not isinstance(row.get(field), str) or label_field not in row:
                    raise SourceError(f"{where}: {path} line {i} needs a string '{field}' and a '{label_field}'; "
                                      "set field and label_field to the keys holding the text and the label")
                if row[field].strip():
                    texts.append(row[field].strip())
                    labels.append(_label_id(row[label_field], label2id, num_labels, f"{where}: {path} line {i}"))
        else:
            delimiter = "\t" if path.suffix == ".tsv" else ","
            with open(path, encoding="utf-8", newline="") as f:
                for i, row in enumerate(csv.reader(f, delimiter=delimiter), 1):
                    if not row or not "".join(row).strip():
                        continue
                    if len(row) < 2:
                        raise SourceError(f"{where}: {path} line {i} has no label; write text{'<TAB>' if delimiter == chr(9) else ','}label rows")
                    text, label = delimiter.join(row[:-1]).strip(), row[-1]
                    if i == 1 and label.strip().lower() == "label":
                        continue  # a header row
                    texts.append(text)
                    labels.append(_label_id(label, label2id, num_labels, f"{where}: {path} line {i}"))
        if not texts:
            raise SourceError(f"{where}: {path} has no inputs; write one labelled input per line")
    if samples:
        texts, labels = texts[:samples], labels[:samples]
    return texts, labels


def load_labelled_eval(source: str, field: str | None, label_field: str | None, samples: int | None,
                       label2id: dict[str, int], num_labels: int, where: str) -> LabelledSet:
    texts, labels = load_labelled(source, field, label_field, samples, label2id, num_labels, where)
    if labels is None:
        raise SourceError(f"{where}: {source} has no labels; task classification scores labelled sets: set label_field "
                          "(.jsonl) or give a .tsv/.csv of text<TAB>label")
    if len(texts) < 2:
        raise SourceError(f"{where}: {source} has {len(texts)} labelled inputs; accuracy needs at least 2")
    name = source.removeprefix("example:") if source.startswith("example:") else Path(source).stem
    return LabelledSet(name, tuple(texts), tuple(labels))
