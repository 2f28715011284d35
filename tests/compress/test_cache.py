import json
import multiprocessing
import os
import time

import pytest

from compress.artifact import seal
from compress.cache import Cache, make_key


def test_key_depends_on_every_part():
    base = make_key("digest", "quantize", {"a": 1}, 1)
    assert base == make_key("digest", "quantize", {"a": 1}, 1)
    assert base != make_key("digest2", "quantize", {"a": 1}, 1)
    assert base != make_key("digest", "export", {"a": 1}, 1)
    assert base != make_key("digest", "quantize", {"a": 2}, 1)
    assert base != make_key("digest", "quantize", {"a": 1}, 2)
    # canonical JSON: key order does not matter
    assert make_key({"a": 1, "b": 2}) == make_key({"b": 2, "a": 1})


def _write(out, text="hello"):
    (out / "model.onnx").write_text(text)
    return seal(out, "onnx", {"x": 1})


def test_produce_then_hit(tmp_path):
    cache = Cache(tmp_path)
    calls = []
    art, hit = cache.artifact("k1", lambda out: calls.append(1) or _write(out))
    assert not hit and calls == [1]
    again, hit = cache.artifact("k1", lambda out: calls.append(1) or _write(out))
    assert hit and calls == [1] and again.digest == art.digest
    assert list((tmp_path / "tmp").iterdir()) == []


def test_failed_stage_leaves_nothing(tmp_path):
    cache = Cache(tmp_path)

    def boom(out):
        (out / "model.onnx").write_text("partial")
        raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError):
        cache.artifact("k2", boom)
    assert cache.get("k2") is None
    assert not (tmp_path / "k2").exists()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_directory_without_meta_does_not_count(tmp_path):
    cache = Cache(tmp_path)
    (tmp_path / "k3").mkdir()
    (tmp_path / "k3" / "model.onnx").write_text("left by a killed build")
    (tmp_path / "tmp" / "k3.999999.1").mkdir()  # a killed build's temporary
    assert cache.get("k3") is None
    art, hit = cache.artifact("k3", _write)
    assert not hit and (art.path / "model.onnx").read_text() == "hello"
    assert not (tmp_path / "tmp" / "k3.999999.1").exists()


def _worker(root, key, log):
    cache = Cache(root)

    def make(out):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        return _write(out, "same")

    art, _ = cache.artifact(key, make)
    return art.digest


def test_concurrent_producers_do_the_work_once(tmp_path):
    log = tmp_path / "calls.log"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        digests = pool.starmap(_worker, [(str(tmp_path / "c"), "shared", str(log))] * 3)
    assert len(set(digests)) == 1
    assert len(log.read_text().split()) == 1
    assert json.loads((tmp_path / "c" / "shared" / "meta.json").read_text())["digest"] == digests[0]
