import json

import numpy as np
import pytest
import torch

import data
from data import (DataConfig, DataError, MaskedSamples, QualityReport, build_pretraining,
                  builtin_documents, encode_chat, held_out_text, prepare, read_source, to_messages, train_bpe,
                  training_side_text, WithGeneralText)

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.\n" * 3,
         "class Point:\n    x: int\n    y: int\n", "Numbers 0123456789 and symbols {}[]()<>!?\n" * 2] * 8


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(TEXTS * 4, vocab_size=400)


def config(tmp_path, **overrides) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"), **overrides)


# ---- config ------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, field", [
    (dict(format="yaml"), "format"), (dict(txt_unit="line"), "txt_unit"), (dict(overlong="cut"), "overlong"),
    (dict(subset_size=0), "subset_size"), (dict(token_budget=-5), "token_budget"),
    (dict(val_fraction=1.0), "val_fraction"), (dict(vocab_size=100), "vocab_size"), (dict(source=""), "source"),
])
def test_config_validation(overrides, field):
    with pytest.raises(ValueError, match=field):
        DataConfig(**overrides)


def test_config_json_round_trip(tmp_path):
    original = DataConfig(source="some/dir", subset_size=10, val_fraction=0.1, tokenizer="gpt2")
    original.to_json(tmp_path / "data.json")
    assert DataConfig.from_json(tmp_path / "data.json") == original
    with pytest.raises(ValueError, match="bogus"):
        DataConfig.from_dict({"bogus": 1})


# ---- sources -----------------------------------------------------------------------------
def test_builtin_corpus_is_deterministic_and_real():
    first = list(builtin_documents(limit=20))
    assert first == list(builtin_documents(limit=20))
    assert len(first) == 20
    assert any("def " in doc for doc in first)  # standard library source


def test_every_local_format_loads(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "nested").mkdir(parents=True)
    (folder / "a.txt").write_text("first document\n\nstill first")
    (folder / "b.md").write_text("# second")
    (folder / "c.jsonl").write_text('{"text": "third"}\n{"text": "fourth"}\n')
    (folder / "d.json").write_text(json.dumps([{"content": "fifth"}]))
    (folder / "nested" / "e.csv").write_text("id,text\n1,sixth\n2,seventh\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["eighth"]}), folder / "nested" / "f.parquet")
    (folder / "ignored.bin").write_bytes(b"\x00")
    items, _ = read_source(config(tmp_path, source=str(folder)))
    assert items == ["first document\n\nstill first", "# second", "third", "fourth", "fifth", "sixth", "seventh",
                     "eighth"]
    paragraphs, _ = read_source(config(tmp_path, source=str(folder / "a.txt"), txt_unit="paragraph"))
    assert paragraphs == ["first document", "still first"]
    subset, _ = read_source(config(tmp_path, source=str(folder), subset_size=3))
    assert subset == items[:3]


def test_text_field_is_configurable_and_missing_fields_are_named(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"title": "t", "body_text": "hello"}\n')
    items, _ = read_source(config(tmp_path, source=str(path), text_field="body_text"))
    assert items == ["hello"]
    with pytest.raises(DataError, match="title, body_text"):
        read_source(config(tmp_path, source=str(path)))
    csv = tmp_path / "table.csv"
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"no field 'text'.*a, b"):
        read_source(config(tmp_path, source=str(csv), text_field="text"))


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_source(config(tmp_path, source=str(tmp_path / "missing.txt")))
    odd = tmp_path / "data.xml"
    odd.write_text("<a/>")
    with pytest.raises(DataError, match="unsupported file type '.xml'"):
        read_source(config(tmp_path, source=str(odd)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": "missing quote}\n')
    with pytest.raises(DataError, match=r"broken.jsonl: line 2"):
        read_source(config(tmp_path, source=str(broken)))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(DataError, match="no supported files"):
        read_source(config(tmp_path, source=str(empty_dir)))


def test_empty_dataset_after_filtering_is_an_error(tmp_path, tokenizer):
    path = tmp_path / "blank.jsonl"
    path.write_text('{"text": "   "}\n{"text": ""}\n')
    with pytest.raises(DataError, match="no documents left after dropping 2 empty"):
        prepare(config(tmp_path, source=str(path)), seq_len=8, tokenizer=tokenizer)


def test_unreachable_hub_fails_fast_or_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "hub_reachable", lambda *args, **kwargs: False)
    with pytest.raises(DataError, match="wikitext.*unreachable.*built-in corpus"):
        read_source(config(tmp_path, source="wikitext", hub_config="wikitext-2-raw-v1"))
    resolved, note = data.resolve_source(config(tmp_path, source="wikitext"), fallback_to_builtin=True)
    assert resolved.source == "builtin" and "unreachable" in note


def test_hub_offline_env_is_honoured(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert data.hub_reachable(timeout_s=30) is False  # answers at once, without a connection attempt


def test_missing_tokenizer_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="no-such-org/no-such-tokenizer"):
        data.load_pretrained_tokenizer("no-such-org/no-such-tokenizer")


# ---- tokenizer -----------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["plain ascii", "emoji 🐟🐠 and CJK 小鱼 ナ", "    indented\n\tcode()  \n\n\n",
                                  "trailing spaces   ", " leading", "a  b   c", "\u00e9\u0301 combining", ""])
def test_bpe_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_bpe_special_tokens_and_save_load(tmp_path, tokenizer):
    assert 256 + 4 < len(tokenizer) <= 400  # all bytes, the specials, then merges up to the target
    assert tokenizer.convert_tokens_to_ids([data.EOT, data.PAD, data.IM_START, data.IM_END]) == [0, 1, 2, 3]
    for token in (data.EOT, data.PAD, data.IM_START, data.IM_END):
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer.eos_token == data.EOT and tokenizer.pad_token == data.PAD
    tokenizer.save_pretrained(tmp_path / "tok")
    again = data.load_tokenizer_dir(tmp_path / "tok")
    assert again("def f(): pass")["input_ids"] == tokenizer("def f(): pass")["input_ids"]
    bare = data.load_tokenizer_dir(tmp_path / "tok" / "tokenizer.json")
    assert bare.decode(bare("héllo")["input_ids"]) == "héllo"
    assert data.tokenizer_hash(again) == data.tokenizer_hash(tokenizer)


# ---- packing and split ---------------------------------------------------------------------
def test_packing_shifts_targets_and_separates_documents(tmp_path, tokenizer):
    report = QualityReport()
    documents = TEXTS + ["", TEXTS[0]]  # one empty, one duplicate
    train, val = build_pretraining(documents, tokenizer, config(tmp_path, val_fraction=0.2), 8, report)
    assert report.empty_dropped == 1 and report.duplicates_dropped == len(TEXTS) - 4 + 1
    assert report.documents_kept == 4
    x, y = train.batch(np.arange(len(train)))
    assert x.shape == (len(train), 8)
    assert (x[:, 1:] == y[:, :-1]).all()  # targets are inputs shifted by one
    assert (x[1:, 0] == y[:-1, -1]).all()  # consecutive blocks continue the stream: no token lost
    eot = tokenizer.eos_token_id
    stream = np.concatenate([train.tokens[0], *[row[1:] for row in train.tokens[1:]]])
    assert stream[0] == eot and (stream == eot).sum() >= report.train_documents - 1
    assert report.train_tokens + report.val_tokens == sum(len(tokenizer(d)["input_ids"]) + 1 for d in TEXTS[:4])


def test_split_is_deterministic_and_disjoint(tmp_path, tokenizer):
    documents = [f"document number {i} " * (i % 5 + 1) for i in range(60)]
    cfg = config(tmp_path, val_fraction=0.25, seed=3)
    lengths = [len(tokenizer(d)["input_ids"]) for d in documents]
    first = data._split_documents(lengths, cfg, min_val_tokens=1)
    assert np.array_equal(first, data._split_documents(lengths, cfg, min_val_tokens=1))
    assert first.sum() == 15
    other = data._split_documents(lengths, config(tmp_path, val_fraction=0.25, seed=4), min_val_tokens=1)
    assert not np.array_equal(first, other)
    # the split is at document level: every validation document's text is absent from training
    report = QualityReport()
    train, val = build_pretraining(documents, tokenizer, cfg, 4, report)
    assert report.val_documents >= 15 and report.train_documents + report.val_documents == 60


def test_tiny_dataset_is_an_error_naming_the_minimum(tmp_path, tokenizer):
    with pytest.raises(DataError, match="too small"):
        build_pretraining(["hi", "yo"], tokenizer, config(tmp_path), 64, QualityReport())


def test_prepare_caches_arrays(tmp_path, tokenizer):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, text in enumerate(TEXTS[:4]):
        (folder / f"{i}.txt").write_text(text * 5)
    cfg = config(tmp_path, source=str(folder), val_fraction=0.25)
    first = prepare(cfg, seq_len=16)  # trains the BPE, tokenizes, caches
    second = prepare(cfg, seq_len=16)
    assert not first.report.cached and second.report.cached
    assert any("trained a" in note for note in first.report.notes)
    assert not any("trained a" in note for note in second.report.notes)  # the cached run trained nothing
    # a cache written before the note was kept out of it still says nothing of training
    (stale,) = (tmp_path / "cache" / "arrays").iterdir()
    report = json.loads((stale / "report.json").read_text())
    (stale / "report.json").write_text(json.dumps({**report, "notes": ["trained a 300-token byte-level BPE on the data"]}))
    assert not any("trained a" in note for note in prepare(cfg, seq_len=16).report.notes)
    assert np.array_equal(first.train.tokens, second.train.tokens)
    assert np.array_equal(first.val.tokens, second.val.tokens)
    assert data.tokenizer_hash(first.tokenizer) == data.tokenizer_hash(second.tokenizer)
    (folder / "0.txt").write_text("changed " * 50)  # a changed source is re-read
    assert not prepare(cfg, seq_len=16).report.cached


# ---- instruction data -----------------------------------------------------------------------
def test_instruction_formats_become_messages():
    alpaca = to_messages({"instruction": "Add", "input": "1 and 2", "output": "3"})
    assert alpaca == [{"role": "user", "content": "Add\n\n1 and 2"}, {"role": "assistant", "content": "3"}]
    assert to_messages({"prompt": "Hi", "response": "Hello"})[1]["content"] == "Hello"
    chat = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"}]
    assert to_messages({"messages": chat}) == chat
    with pytest.raises(DataError, match="role"):
        to_messages({"messages": [{"content": "no role"}]})


def test_prompt_tokens_are_masked(tokenizer):
    messages = [{"role": "user", "content": "What is 1+2?"}, {"role": "assistant", "content": "3"},
                {"role": "user", "content": "And 2+2?"}, {"role": "assistant", "content": "4"}]
    ids, labels = encode_chat(messages, tokenizer)
    kept = tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])
    assert kept == "3<|im_end|>\n4<|im_end|>\n"
    assert all(label in (-100, token) for token, label in zip(ids, labels))


def test_instruction_pipeline_masks_pads_and_counts(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    records = [{"instruction": f"Say {i}", "output": f"{i}"} for i in range(10)]
    records.append({"instruction": "long " * 200, "output": "x"})  # prompt alone exceeds the sequence
    path.write_text("\n".join(json.dumps(r) for r in records))
    prepared = prepare(config(tmp_path, source=str(path), val_fraction=0.2), seq_len=24, tokenizer=tokenizer)
    assert isinstance(prepared.train, MaskedSamples)
    report = prepared.report
    assert report.format == "instruction" and report.dropped_samples == 1 and report.truncated_samples == 1
    x, y = prepared.train.batch(np.arange(len(prepared.train)))
    assert x.shape[1] == 24
    pad_positions = x == tokenizer.pad_token_id
    assert (y[pad_positions] == -100).all()
    for row_x, row_y in zip(x, y):
        kept = [int(t) for t in row_y if t != -100]
        assert tokenizer.decode(kept).endswith("<|im_end|>\n")
    dropped = prepare(config(tmp_path, source=str(path), val_fraction=0.2, overlong="drop"), seq_len=24,
                      tokenizer=tokenizer)
    assert dropped.report.dropped_samples == 1 and dropped.report.truncated_samples == 0


def test_a_single_document_is_split_by_position(tmp_path, tokenizer):
    book = tmp_path / "book.txt"
    book.write_text(" ".join(TEXTS) * 3)
    prepared = prepare(config(tmp_path, source=str(book)), seq_len=16, tokenizer=tokenizer)
    assert len(prepared.train) > 0 and len(prepared.val) > 0
    assert any("one document" in note for note in prepared.report.notes)
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(DataError, match="too small"):
        prepare(config(tmp_path, source=str(short)), seq_len=16, tokenizer=tokenizer)


def test_huge_documents_are_read_in_pieces_that_encode_like_the_whole(tmp_path):
    """A single-line file much longer than piece_chars: the pieces rebuild the text, and the
    ids are those of encoding it whole (memory stays bounded by the piece size)."""
    from data import _tokenize, pieces

    rng = np.random.default_rng(0)
    text = " ".join(f"w{i}" for i in rng.integers(0, 500, 40_000)) + "  double  spaces\tand\ttabs"
    cut = list(pieces(text, 5_000))
    assert "".join(cut) == text and max(map(len, cut)) <= 5_000 and len(cut) >= len(text) // 5_000
    assert all(piece.startswith(" ") for piece in cut[1:-1])
    tokenizer = data.train_bpe([text], vocab_size=400, piece_chars=5_000)
    (ids,) = _tokenize([text], tokenizer, 0, piece_chars=5_000)
    assert ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="piece_chars"):
        DataConfig(piece_chars=10)


def test_replayed_general_text_never_holds_what_the_guard_measures(tmp_path):
    import re as regex
    with open(tmp_path / "docs.jsonl", "w") as file:
        for index in range(40):
            file.write(json.dumps({"text": f"document {index} says " + "the sea is wide " * 6}) + "\n")
    tokenizer = train_bpe([f"document {i} says the sea is wide" for i in range(40)], vocab_size=300)
    config = DataConfig(source=str(tmp_path / "docs.jsonl"), cache_dir=str(tmp_path / "cache"), format="text",
                        val_fraction=0.25)
    ids = {}
    for name, read in (("guard", held_out_text), ("replay", training_side_text)):
        blocks = read(config, tokenizer, 32, 12)
        assert len(blocks) >= 1 and blocks.seq_len == 32
        ids[name] = {int(i) for i in regex.findall(r"document (\d+)", tokenizer.decode(blocks.tokens.reshape(-1)))}
        assert ids[name]
    assert not ids["guard"] & ids["replay"]  # the guard's documents are the split's validation side
    assert len(ids["guard"]) <= 10
    # beside masked task samples, every token of the general text is a target, a fresh window of the pool each epoch
    task = MaskedSamples(np.full((3, 32), 5, dtype=np.int32), np.full((3, 32), -100, dtype=np.int32))
    pool = training_side_text(config, tokenizer, 32, 5)
    assert len(pool) >= 5
    mixed = WithGeneralText(task, pool, 2)
    assert len(mixed) == 5
    for epoch, rows in ((0, [0, 1]), (1, [2, 3]), (2, [4 % len(pool), 5 % len(pool)])):
        inputs, targets = mixed.batch(np.array([4, 0, 3]), epoch)
        assert torch.equal(inputs[0], torch.from_numpy(pool.tokens[rows[1], :-1].astype(np.int64)))
        assert torch.equal(inputs[2], torch.from_numpy(pool.tokens[rows[0], :-1].astype(np.int64)))
        assert torch.equal(targets[2], torch.from_numpy(pool.tokens[rows[0], 1:].astype(np.int64)))
        assert (targets[1] == -100).all() and (inputs[1] == 5).all()
    with pytest.raises(ValueError, match="blocks of 16"):
        WithGeneralText(task, training_side_text(config, tokenizer, 16, 4), 2)


def test_tokenizing_reports_progress_per_chunk_up_to_all_documents_and_records(tmp_path, tokenizer, monkeypatch):
    """Progress events count documents (or records) done of all, in chunks (not one per
    document), rising to the total; without a callback nothing changes."""
    from events import Progress

    monkeypatch.setattr(data, "TOKENIZE_CHUNK_CHARS", 200)  # a few documents a chunk
    monkeypatch.setattr(data, "INSTRUCTION_CHUNK", 4)
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"{i} {text}"}) for i, text in enumerate(TEXTS)))
    events = []
    prepared = prepare(config(tmp_path, source=str(path)), 8, tokenizer=tokenizer, progress=events.append)
    total = prepared.report.documents_kept
    done = [event.done for event in events]
    assert all(isinstance(e, Progress) and e.unit == "documents" and e.total == total for e in events)
    assert done == sorted(set(done)) and done[-1] == total and 2 < len(done) < total
    assert events[-1].eta_s == 0 and events[0].task == "tokenizing documents"
    unreported = prepare(config(tmp_path / "again", source=str(path)), 8, tokenizer=tokenizer)
    assert np.array_equal(unreported.train.tokens, prepared.train.tokens)

    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"instruction": f"Say {i}", "output": f"{i}"}) for i in range(10)))
    records = []
    prepare(config(tmp_path, source=str(chat)), 24, tokenizer=tokenizer, progress=records.append)
    assert [(e.done, e.total, e.unit) for e in records] == [(4, 10, "records"), (8, 10, "records"),
                                                            (10, 10, "records")]
