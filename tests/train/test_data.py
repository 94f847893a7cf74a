"""Data: byte tokenizer, default stdlib corpus, --data formats, cache, split, windows, resumable sampler."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from vbhal.train import data as D
from vbhal.train._errors import DataError


def test_encode_decode_round_trip_unicode():
    text = "def f(x):\n    return 'é ü ∑ 🙂'\n"
    ids = D.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode())
    assert D.decode(ids) == text
    assert D.decode(ids + [D.EOS_ID] + D.encode("after")) == text  # stops at EOS
    assert D.decode([300, 104, 105]) == "hi"                      # non-byte ids are dropped


def test_stdlib_corpus_is_deterministic_and_capped():
    a = D.load_corpus(max_bytes=64 * 1024)
    b = D.load_corpus(max_bytes=64 * 1024, use_cache=False)
    assert np.array_equal(np.asarray(a.train), np.asarray(b.train))
    assert np.array_equal(np.asarray(a.val), np.asarray(b.val))
    total = a.num_train_tokens + a.num_val_tokens
    assert 0 < total <= 64 * 1024 + a.num_documents       # bytes + one EOS per document
    files = D.stdlib_files()
    root = D.Path(D.sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and not any("site-packages" in r for r in rel)
    # Whole files in sorted order: the corpus starts with the first file's bytes, then EOS.
    first = files[0].read_bytes()
    train = np.asarray(a.train)
    assert bytes(train[:len(first)].astype(np.uint8)) == first and train[len(first)] == D.EOS_ID

def test_cache_is_reused_and_keyed_by_the_cap(tmp_path):
    D.load_corpus(max_bytes=32 * 1024)
    cached = sorted(p.name for p in D.cache_dir().glob("corpus-*.train.bin"))
    D.load_corpus(max_bytes=32 * 1024)
    assert sorted(p.name for p in D.cache_dir().glob("corpus-*.train.bin")) == cached
    D.load_corpus(max_bytes=48 * 1024)
    assert len(list(D.cache_dir().glob("corpus-*.train.bin"))) == len(cached) + 1


def test_text_folder_split_by_document_is_deterministic(corpus_dir):
    c = D.load_corpus(corpus_dir)
    assert c.num_documents == 60
    n_eos_val = int((np.asarray(c.val) == D.EOS_ID).sum())
    assert n_eos_val == 3                                    # docs 10, 30, 50 (every 20th)
    val_text = D.decode(np.asarray(c.val), stop_at_eos=True)
    doc10 = open(os.path.join(corpus_dir, "doc_010.txt")).read()
    assert val_text == doc10


def test_jsonl_text_field(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"text": f"record {i} " * 5, "id": i} for i in range(50)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    c = D.load_corpus(str(p))
    assert c.num_documents == 50
    allt = np.concatenate([np.asarray(c.train), np.asarray(c.val)])
    assert int((allt == D.EOS_ID).sum()) == 50


@pytest.mark.parametrize("line, word", [("{not json", "not valid JSON"), ('{"body": "x"}', '"text" field')])
def test_bad_jsonl_names_the_line(tmp_path, line, word):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=word) as e:
        D.load_corpus(str(p), use_cache=False)
    assert "bad.jsonl:2" in str(e.value)


def test_pretokenised_bin_with_and_without_val(tmp_path):
    toks = np.random.default_rng(0).integers(0, 257, 10_000).astype(np.uint16)
    toks.tofile(tmp_path / "c.bin")
    c = D.load_corpus(str(tmp_path / "c.bin"))
    assert c.num_train_tokens == 9500 and np.array_equal(np.asarray(c.val), toks[9500:])
    toks[:100].tofile(tmp_path / "c.val.bin")
    c = D.load_corpus(str(tmp_path / "c.bin"))
    assert c.num_train_tokens == 10_000 and np.array_equal(np.asarray(c.val), toks[:100])
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(DataError, match="odd number of bytes"):
        D.load_corpus(str(tmp_path / "odd.bin"))


def test_missing_and_empty_data_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        D.load_corpus(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no text files"):
        D.load_corpus(str(tmp_path / "empty"))
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        D.load_corpus(str(tmp_path / "empty"), use_cache=False)


def test_windows_are_shifted_pairs_and_too_short_data_is_refused():
    toks = np.arange(1, 101, dtype=np.uint16)
    ds = D.TokenWindows(toks, 8)
    assert len(ds) == (100 - 1) // 8
    x, y = ds[3]
    assert x.dtype == torch.int64 and torch.equal(x, torch.arange(25, 33)) and torch.equal(y, x + 1)
    with pytest.raises(DataError, match="seq_length"):
        D.TokenWindows(toks, 100)


def test_sampler_is_a_function_of_seed_and_epoch_and_resumes():
    ds = D.TokenWindows(np.arange(1001, dtype=np.uint16), 10)   # 100 windows
    s = D.ResumableSampler(ds, seed=5)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(e0) == list(range(100)) and e0 != e1
    s.set_epoch(0)
    s.set_start(37)
    assert list(s) == e0[37:] and len(s) == 63


def test_sampler_ranks_partition_and_resume_with_another_world_size():
    ds = D.TokenWindows(np.arange(1001, dtype=np.uint16), 10)
    full = D.ResumableSampler(ds, seed=1)
    full.set_epoch(2)
    perm = list(full)
    ranks = []
    for r in range(2):
        s = D.ResumableSampler(ds, num_replicas=2, rank=r, seed=1)
        s.set_epoch(2)
        ranks.append(list(s))
    assert ranks[0] == perm[0::2] and ranks[1] == perm[1::2]
    # 40 global samples consumed by 2 ranks -> a 4-rank run continues at the same permutation point
    consumed = set(ranks[0][:20] + ranks[1][:20])
    rest = []
    for r in range(4):
        s = D.ResumableSampler(ds, num_replicas=4, rank=r, seed=1)
        s.set_epoch(2)
        s.set_start(40)
        rest += list(s)
    assert consumed.isdisjoint(rest) and consumed == set(perm[:40])
    with pytest.raises(DataError, match="divisible"):
        D.ResumableSampler(ds, num_replicas=3, rank=0).set_start(40)


def test_loader_settings_sized_to_device():
    cpu = D.loader_settings(torch.device("cpu"), None)
    assert cpu == {"num_workers": 0, "pin_memory": False}
    gpu = D.loader_settings(torch.device("cuda", 0), None)
    assert gpu["pin_memory"] and gpu["num_workers"] >= 1 and gpu["persistent_workers"] and gpu["prefetch_factor"] == 4
