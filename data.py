"""Datasets: sources (built-in corpus, local files, the Hugging Face hub), the tokenizer
(a byte-level BPE trained here, or a pretrained one), packing for pretraining, prompt
masking for instruction data, the train/validation split, a quality report and an
on-disk cache of tokenized arrays.

Nothing here prints: problems are `DataError`s with a message meant for the user, and
what happened along the way is in the `QualityReport`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import socket
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Iterator, Optional

import numpy as np
import torch

from config_io import ConfigIO, described
from events import Callback, progress_reporter

BUILTIN = "builtin"
BUILTIN_NAME = "python-stdlib"
TEXT_EXTENSIONS = {".txt", ".md"}
RECORD_EXTENSIONS = {".json", ".jsonl", ".csv", ".parquet"}
TEXT_FIELDS = ("text", "content", "document", "body", "story", "article", "sentence")
EOT, PAD, IM_START, IM_END = "<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# For a tokenizer that has no chat template and no ChatML tokens: the Alpaca layout, each
# answer ended by the tokenizer's own end-of-text token (so generation knows where to stop).
ALPACA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)
HUB_HOST = ("huggingface.co", 443)
_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
FORMAT_VERSION = 1  # bump when the cached arrays' meaning changes


class DataError(ValueError):
    """A problem with the user's data or data settings, explained for the user."""


@dataclass
class DataConfig(ConfigIO):
    """Where the training text comes from and how it becomes token blocks."""

    section: ClassVar[str] = "data"

    source: str = described(BUILTIN, 
        "'builtin' (offline Python stdlib corpus), a local file or folder, or a Hugging Face hub dataset name")
    hub_config: Optional[str] = described(None, "hub dataset configuration, e.g. wikitext-2-raw-v1")
    split: str = described("train", "hub dataset split")
    text_field: Optional[str] = described(None, "record field holding the text; auto-detected when empty")
    format: str = described("auto", "text (pretraining), instruction (chat / Alpaca, loss on responses), or auto",
                                                       choices=("auto", "text", "instruction"))
    txt_unit: str = described("file", "a .txt/.md document is a whole file or each blank-line paragraph",
                                                         choices=("file", "paragraph"))
    subset_size: Optional[int] = described(None, "use only the first N documents (LightLM's subset mode)")
    token_budget: Optional[int] = described(None, "stop reading documents after about this many tokens")
    dedupe: bool = described(True, "drop exact duplicate documents (counted in the report)")
    val_fraction: float = described(0.05, "share of documents held out for validation")
    seed: int = described(1998, "seed of the train/validation split")
    tokenizer: str = described("bpe", "'bpe' trains a byte-level BPE on the data; else a hub id or local directory")
    vocab_size: int = described(8192, "vocabulary of the trained BPE")
    bpe_sample_bytes: int = described(8_000_000, "train the BPE on at most this much text")
    piece_chars: int = described(1_000_000, "documents longer than this are tokenized (and sampled for the BPE) "
                                            "in pieces of this many characters, cut at a space: it bounds memory "
                                            "for huge single-line files")
    overlong: str = described("truncate", "instruction samples longer than the sequence: truncate or drop",
                                                             choices=("truncate", "drop"))
    num_proc: int = described(0, "tokenizer processes (0 = one, in-process)")
    cache_dir: str = described(".cache/sprat", "where tokenized arrays and trained tokenizers are cached")
    hub_timeout_s: float = described(3.0, "seconds to wait for the hub before calling it unreachable")

    def __post_init__(self) -> None:
        for name in ("format", "txt_unit", "overlong"):
            choices = self.choices(name)
            if getattr(self, name) not in choices:
                raise ValueError(f"DataConfig.{name}={getattr(self, name)!r}: must be one of {', '.join(choices)}")
        for name in ("subset_size", "token_budget"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"DataConfig.{name}={value!r}: must be a positive integer or empty")
        if not isinstance(self.val_fraction, (int, float)) or not 0 < self.val_fraction < 1:
            raise ValueError(f"DataConfig.val_fraction={self.val_fraction!r}: must be between 0 and 1 (exclusive)")
        if not isinstance(self.vocab_size, int) or not 300 <= self.vocab_size <= 1_000_000:
            raise ValueError(f"DataConfig.vocab_size={self.vocab_size!r}: must be an integer in [300, 1000000] "
                             f"(256 byte symbols plus merges and special tokens)")
        if isinstance(self.piece_chars, bool) or not isinstance(self.piece_chars, int) or self.piece_chars < 1000:
            raise ValueError(f"DataConfig.piece_chars={self.piece_chars!r}: must be an integer >= 1000")
        if not isinstance(self.num_proc, int) or self.num_proc < 0:
            raise ValueError(f"DataConfig.num_proc={self.num_proc!r}: must be an integer >= 0")
        if not self.source or not str(self.source).strip():
            raise ValueError("DataConfig.source='': name 'builtin', a local file or folder, or a hub dataset")
        if not self.hub_timeout_s > 0:
            raise ValueError(f"DataConfig.hub_timeout_s={self.hub_timeout_s!r}: must be positive")


@dataclass
class QualityReport:
    """What reading and tokenizing the data did; the UI renders it."""

    source: str = ""
    format: str = "text"
    notes: list[str] = field(default_factory=list)
    documents_read: int = 0
    documents_kept: int = 0
    empty_dropped: int = 0
    duplicates_dropped: int = 0
    train_documents: int = 0
    val_documents: int = 0
    train_tokens: int = 0
    val_tokens: int = 0
    length_mean: float = 0.0
    length_p50: float = 0.0
    length_p95: float = 0.0
    length_max: int = 0
    truncated_samples: int = 0
    dropped_samples: int = 0
    train_blocks: int = 0
    val_blocks: int = 0
    seconds: float = 0.0
    cached: bool = False


# ---- sources ----------------------------------------------------------------------------
def _stdlib_paths() -> list[Path]:
    """The standard library's modules, without site-packages and test suites (pruned, not walked)."""
    paths = []
    for folder, subfolders, files in os.walk(sysconfig.get_paths()["stdlib"]):
        subfolders[:] = [name for name in subfolders if name not in _SKIPPED_DIRS]
        paths.extend(Path(folder) / name for name in files if name.endswith(".py"))
    return sorted(paths)


def builtin_documents(limit: Optional[int] = None) -> Iterator[str]:
    """The built-in offline corpus: the running Python's standard library source (one
    document per module, test suites excluded) followed by the `pydoc_data` topic texts,
    about 12 MB of real code and English documentation on every Python install. The
    order is deterministic (sorted paths, then sorted topics)."""
    count = 0
    for path in _stdlib_paths():
        if limit is not None and count >= limit:
            return
        count += 1
        yield path.read_text(encoding="utf-8", errors="replace")
    from pydoc_data.topics import topics

    for name in sorted(topics):
        if limit is not None and count >= limit:
            return
        count += 1
        yield topics[name]


TRAINED_BPE_NOTE = "trained a"  # said by the run that trained the tokenizer, never by one that read it back


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def offline_variable() -> Optional[str]:
    """The first of OFFLINE_VARIABLES that is set to a true value (the user chose not to
    reach the hub), or None."""
    return next((name for name in OFFLINE_VARIABLES
                 if os.environ.get(name, "").lower() in ("1", "true", "yes", "on")), None)


def hub_offline_mode() -> bool:
    """HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set: the user chose not to reach the hub."""
    return offline_variable() is not None


def offline_mode_text() -> str:
    """'offline mode (HF_HUB_OFFLINE is set)': how every front end names the user's choice,
    which is not a fault like an unreachable hub."""
    return f"offline mode ({offline_variable() or 'HF_HUB_OFFLINE'} is set)"


def hub_reachable(timeout_s: float = 3.0, host: tuple[str, int] = HUB_HOST) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within `timeout_s`; False
    at once in offline mode."""
    if hub_offline_mode():
        return False
    try:
        with socket.create_connection(host, timeout=timeout_s):
            return True
    except OSError:
        return False


def read_text_file(path: Path, report: QualityReport) -> str:
    """A text file as UTF-8. Binary or UTF-16 files (NUL bytes) are refused; bytes that are
    not UTF-8 (a latin-1 file) become U+FFFD, and the report says how many."""
    data = path.read_bytes()
    if b"\x00" in data[:1 << 16]:
        encoding = "UTF-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "binary data"
        raise DataError(f"{path}: looks like {encoding}, not UTF-8 text (it has NUL bytes); convert it to UTF-8 "
                        f"(e.g. iconv -t UTF-8) or leave it out")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        report.notes.append(f"{path.name} is not valid UTF-8: {text.count(chr(0xFFFD)):,} undecodable bytes were "
                            f"replaced with U+FFFD; convert it to UTF-8 (e.g. iconv -f latin1 -t UTF-8) to keep them")
        return text


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_EXTENSIONS | RECORD_EXTENSIONS)
        if not files:
            raise DataError(f"{path} holds no supported files ({', '.join(sorted(TEXT_EXTENSIONS | RECORD_EXTENSIONS))})")
        return files
    if not path.is_file():
        raise DataError(f"{path}: not a regular file (a FIFO, device or socket); Sprat reads only regular files")
    suffix = path.suffix.lower()
    if suffix not in TEXT_EXTENSIONS | RECORD_EXTENSIONS:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; supported: "
                        f"{', '.join(sorted(TEXT_EXTENSIONS | RECORD_EXTENSIONS))}")
    return [path]


def _json_error(path: Path) -> Optional[str]:
    """The first malformed line of a JSON Lines file (or the JSON document), described."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json":
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as error:
            if text.lstrip().startswith("["):
                return f"{path}: line {error.lineno}: {error.msg}"
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as error:
                return f"{path}: line {number}: malformed JSON ({error.msg})"
    return None


def _read_records(path: Path) -> list[dict]:
    """Records of a .json/.jsonl/.csv/.parquet file through `datasets`' builders."""
    import datasets

    builder = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}[path.suffix.lower()]
    if builder == "json":
        problem = _json_error(path)
        if problem:
            raise DataError(problem)
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # datasets wraps parser errors in many types
        raise DataError(f"{path}: cannot be read as {builder}: {error}") from error
    return table.to_list()


def _text_of(record: dict, text_field: Optional[str], origin: str) -> str:
    if text_field is not None:
        if text_field not in record:
            raise DataError(f"{origin}: no field {text_field!r}; fields found: {', '.join(record) or '(none)'}")
        value = record[text_field]
        return "" if value is None else str(value)
    for name in TEXT_FIELDS:
        if name in record and isinstance(record[name], str):
            return record[name]
    raise DataError(f"{origin}: no text field found (tried {', '.join(TEXT_FIELDS)}); fields found: "
                    f"{', '.join(record) or '(none)'}; set the text field (data.text_field=NAME)")


def is_instruction_record(record: dict) -> bool:
    return ("instruction" in record and "output" in record) or ("prompt" in record and
            ("response" in record or "completion" in record)) or isinstance(record.get("messages"), list)


def is_hub_source(source: str) -> bool:
    return source != BUILTIN and not Path(source).expanduser().exists() and not _looks_like_path(source)


def resolve_source(config: DataConfig, fallback_to_builtin: bool) -> tuple[DataConfig, Optional[str]]:
    """`config` itself, or — for a hub dataset while the hub is unreachable and fallback
    is allowed — the built-in corpus instead, with a note saying so."""
    if not fallback_to_builtin or not is_hub_source(config.source) or hub_reachable(config.hub_timeout_s):
        return config, None
    name = config.source if config.hub_config is None else f"{config.source} ({config.hub_config})"
    note = (f"the Hugging Face hub is unreachable, so {name} could not be fetched; "
            f"using the built-in corpus ({BUILTIN_NAME}) instead")
    return dataclasses.replace(config, source=BUILTIN), note


def read_source(config: DataConfig) -> tuple[list, QualityReport]:
    """The documents (strings) or instruction records (dicts) of `config.source`, in a
    deterministic order, with the subset limit applied, and a report of what was read."""
    report = QualityReport(source=config.source)
    limit = config.subset_size
    source = config.source
    if source == BUILTIN:
        report.source = f"{BUILTIN} ({BUILTIN_NAME})"
        return list(builtin_documents(limit)), report
    path = Path(source).expanduser()
    if path.exists():
        items: list = []
        kinds: dict[str, str] = {}  # the first file of each kind of item: text, instruction records
        for file in _local_files(path):
            if limit is not None and len(items) >= limit:
                break
            if file.suffix.lower() in TEXT_EXTENSIONS:
                if config.format == "instruction":
                    raise DataError(f"{file}: plain text, but fine-tuning needs instruction records: a .json, "
                                    f".jsonl, .csv or .parquet file with instruction/output, prompt/response or "
                                    f"messages fields")
                text = read_text_file(file, report)
                new = re.split(r"\n\s*\n", text) if config.txt_unit == "paragraph" else [text]
            else:
                new = _records_to_items(_read_records(file), config, str(file))
            for item in new[:1]:
                kinds.setdefault("instruction records" if isinstance(item, dict) else "plain text", str(file))
            items.extend(new)
        if len(kinds) > 1:
            raise DataError(f"{path} mixes plain text ({kinds['plain text']}, ...) and instruction records "
                            f"({kinds['instruction records']}, ...): pretraining reads text, fine-tuning reads "
                            f"records; put them in separate folders")
        return items[:limit] if limit is not None else items, report
    if _looks_like_path(source):
        raise DataError(f"{source}: no such file or folder")
    return _read_hub(config, report)


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix.lower() in TEXT_EXTENSIONS | RECORD_EXTENSIONS


def _records_to_items(records: list[dict], config: DataConfig, origin: str) -> list:
    if not records:
        return []
    instruction = config.format == "instruction" or (config.format == "auto" and is_instruction_record(records[0]))
    if instruction:
        for number, record in enumerate(records, start=1):
            if not is_instruction_record(record):
                raise DataError(f"{origin}: record {number} is not an instruction record (needs instruction/output, "
                                f"prompt/response or messages); fields found: {', '.join(record)}")
        return records
    return [_text_of(record, config.text_field, f"{origin}, record {number}")
            for number, record in enumerate(records, start=1)]


def _read_hub(config: DataConfig, report: QualityReport) -> tuple[list, QualityReport]:
    name = config.source if config.hub_config is None else f"{config.source} ({config.hub_config})"
    offline = hub_offline_mode()
    if not offline and not hub_reachable(config.hub_timeout_s):
        raise DataError(f"cannot fetch the hub dataset {name}: the Hugging Face hub is unreachable. "
                        f"Use the built-in corpus (--data builtin) or a local file or folder.")
    import datasets

    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(config.source, config.hub_config, split=config.split)
    except Exception as error:
        raise DataError(f"cannot load the hub dataset {name} (split {config.split!r}): {error}. "
                        f"Use the built-in corpus (--data builtin) or a local file or folder.") from error
    if config.subset_size is not None and config.subset_size < len(table):
        table = table.select(range(config.subset_size))
    report.source = f"hub:{name}"
    return _records_to_items(table.to_list(), config, f"hub dataset {name}"), report


# ---- tokenizer ----------------------------------------------------------------------------
def pieces(text: str, size: int) -> Iterator[str]:
    """`text` in consecutive pieces of at most `size` characters, each cut just before a
    space where there is one in the second half of the piece. The byte-level BPE's
    pre-tokenizer starts a word at a space, so the pieces encode to the ids of the whole."""
    start = 0
    while len(text) - start > size:
        cut = text.rfind(" ", start + size // 2, start + size)
        cut = cut if cut > start else start + size
        yield text[start:cut]
        start = cut
    yield text[start:]


def _sample_texts(texts: Iterable[str], max_bytes: int, piece_chars: int) -> Iterator[str]:
    used = 0
    for text in texts:
        for piece in pieces(text, piece_chars):
            if used >= max_bytes:
                return
            used += len(piece.encode("utf-8", errors="replace"))
            yield piece


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, max_bytes: int = 8_000_000,
              piece_chars: int = 1_000_000):
    """A byte-level BPE trained with `tokenizers` on (a sample of) `texts`, as a
    `PreTrainedTokenizerFast` with end-of-text, pad and ChatML special tokens and a
    ChatML chat template. Any UTF-8 text round-trips exactly through encode/decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT, PAD, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(_sample_texts(texts, max_bytes, piece_chars), trainer=trainer)
    return _wrap(backend)


def _wrap(backend):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOT, bos_token=EOT, pad_token=PAD,
                                        additional_special_tokens=[IM_START, IM_END],
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.model_max_length = 1 << 30  # we crop to context_len ourselves; silence length warnings
    return tokenizer


def refuse_remote_code(directory: Path) -> None:
    """Sprat never runs code that comes with a model or tokenizer: a directory whose configs
    name their own Python classes (`auto_map`) is refused before transformers reads it."""
    for name in ("tokenizer_config.json", "config.json"):
        file = directory / name
        if not file.is_file():
            continue
        try:
            values = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as error:
            raise DataError(f"{file}: not valid JSON ({str(error)[:120]})") from None
        if isinstance(values, dict) and "auto_map" in values:
            raise DataError(f"{file} names custom code (auto_map: {', '.join(map(str, values['auto_map']))[:120]}); "
                            f"Sprat does not run code shipped with a model or tokenizer. Use a directory with "
                            f"standard Llama files, or remove auto_map if you trust and do not need that code")


def load_tokenizer_dir(path: str | Path):
    """A tokenizer saved by `save_pretrained` or a bare `tokenizer.json`."""
    path = Path(path)
    if path.is_dir() and (path / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        refuse_remote_code(path)
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    file = path if path.is_file() else path / "tokenizer.json"
    if not file.exists():
        raise DataError(f"{path} holds no tokenizer (no tokenizer.json or tokenizer_config.json)")
    from tokenizers import Tokenizer

    return _wrap(Tokenizer.from_file(str(file)))


def load_pretrained_tokenizer(name: str, timeout_s: float = 3.0):
    """A Hugging Face tokenizer by hub id or local directory, with an end-of-text and a pad token."""
    from transformers import AutoTokenizer

    path = Path(name).expanduser()
    if path.exists():
        tokenizer = load_tokenizer_dir(path)
    else:
        local_only = not hub_reachable(timeout_s)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only, trust_remote_code=False)
        except Exception as error:
            where = "is not in the local cache and the hub is unreachable" if local_only else "could not be loaded"
            raise DataError(f"tokenizer {name!r} {where} ({type(error).__name__}). Use tokenizer 'bpe' to train "
                            f"one on your data, or a local tokenizer directory.") from error
    if tokenizer.eos_token is None:
        raise DataError(f"tokenizer {name!r} has no end-of-text token; it cannot separate documents")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = default_chat_template(tokenizer)
    return tokenizer


def default_chat_template(tokenizer) -> str:
    """ChatML when the tokenizer has its tokens as single tokens, else the Alpaca layout
    ending answers with the end-of-text token."""
    ids = tokenizer.convert_tokens_to_ids([IM_START, IM_END])
    if all(i is not None and i != tokenizer.unk_token_id for i in ids):
        return CHATML_TEMPLATE
    return ALPACA_TEMPLATE


def template_note(tokenizer) -> Optional[str]:
    """What a fine-tune should be told when the tokenizer came without a chat template."""
    if tokenizer.chat_template == ALPACA_TEMPLATE:
        return (f"the tokenizer has no chat template (nor ChatML tokens): conversations use the Alpaca layout "
                f"(### Instruction / ### Response), each answer ending with {tokenizer.eos_token}")
    return None


def tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    serial = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    serial += str(tokenizer.chat_template)
    return hashlib.sha256(serial.encode()).hexdigest()[:16]


# ---- fingerprints and cache ------------------------------------------------------------------
def source_fingerprint(config: DataConfig) -> str:
    """Changes when the source's content may have changed (paths, sizes, mtimes)."""
    digest = hashlib.sha256()
    if config.source == BUILTIN:
        digest.update(f"{BUILTIN}:{sys.version}:{sysconfig.get_paths()['stdlib']}".encode())
        for path in _stdlib_paths():
            stat = path.stat()
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    elif Path(config.source).expanduser().exists():
        for path in _local_files(Path(config.source).expanduser()):
            stat = path.stat()
            digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    else:
        digest.update(f"hub:{config.source}:{config.hub_config}:{config.split}".encode())
    reading = {k: getattr(config, k) for k in ("hub_config", "split", "text_field", "format", "txt_unit",
                                                "subset_size", "token_budget", "dedupe", "val_fraction", "seed",
                                                "overlong", "piece_chars")}
    digest.update(json.dumps(reading, sort_keys=True).encode())
    digest.update(str(FORMAT_VERSION).encode())
    return digest.hexdigest()[:16]


# ---- token datasets ------------------------------------------------------------------------------
class PackedBlocks:
    """Pretraining blocks: row i is `seq_len + 1` consecutive tokens of the packed stream;
    inputs are row[:-1], targets row[1:]. Consecutive rows overlap by one token so every
    token of the stream is a target exactly once."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens = tokens  # (N, seq_len + 1)
        self.seq_len = seq_len

    @classmethod
    def from_stream(cls, stream: np.ndarray, seq_len: int) -> "PackedBlocks":
        count = max(0, (len(stream) - 1) // seq_len)
        if count == 0:  # shorter than one block
            return cls(np.zeros((0, seq_len + 1), dtype=stream.dtype), seq_len)
        rows = np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)[::seq_len][:count]
        return cls(np.ascontiguousarray(rows), seq_len)

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(self.tokens[indices].astype(np.int64))  # (B, T+1)
        return rows[:, :-1], rows[:, 1:]


class MaskedSamples:
    """Instruction samples, one per row, padded: targets are -100 on prompts and padding."""

    def __init__(self, inputs: np.ndarray, targets: np.ndarray):
        self.inputs, self.targets = inputs, targets  # (N, seq_len) each
        self.seq_len = inputs.shape[1]

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(self.inputs[indices].astype(np.int64)),
                torch.from_numpy(self.targets[indices].astype(np.int64)))


class WithGeneralText:
    """Instruction samples followed by `per_epoch` blocks of general text, every token of
    which is a target: what a fine-tune replays so the base keeps what it knew. Each
    epoch reads the next `per_epoch` blocks of `pool` (wrapping around), so a long run
    keeps meeting fresh text instead of learning a few blocks by heart. The rows are a
    function of (indices, epoch) alone: a resumed run reads what it would have."""

    epoch_dependent = True  # the loader passes the epoch to `batch`

    def __init__(self, task: MaskedSamples, pool: PackedBlocks, per_epoch: int):
        if pool.seq_len != task.seq_len:
            raise ValueError(f"general text in blocks of {pool.seq_len} tokens, the task's samples {task.seq_len}")
        if not 1 <= per_epoch <= len(pool):
            raise ValueError(f"{per_epoch} general blocks an epoch from a pool of {len(pool)}")
        self.task, self.pool, self.per_epoch = task, pool, per_epoch
        self.seq_len = task.seq_len

    def __len__(self) -> int:
        return len(self.task) + self.per_epoch

    def rows(self, indices: np.ndarray, epoch: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) as int32 arrays."""
        indices = np.asarray(indices)
        general = indices >= len(self.task)
        inputs = np.empty((len(indices), self.seq_len), dtype=np.int32)
        targets = np.empty_like(inputs)
        inputs[~general], targets[~general] = self.task.inputs[indices[~general]], self.task.targets[indices[~general]]
        blocks = self.pool.tokens[(indices[general] - len(self.task) + epoch * self.per_epoch) % len(self.pool)]
        inputs[general], targets[general] = blocks[:, :-1], blocks[:, 1:]
        return inputs, targets

    def batch(self, indices: np.ndarray, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.rows(indices, epoch)
        return torch.from_numpy(inputs.astype(np.int64)), torch.from_numpy(targets.astype(np.int64))


@dataclass
class PreparedData:
    """Everything training needs from the data side. `config` is the one actually used
    (the built-in corpus after a fallback)."""

    tokenizer: object
    train: PackedBlocks | MaskedSamples | WithGeneralText
    val: PackedBlocks | MaskedSamples
    report: QualityReport
    fingerprint: str
    config: Optional[DataConfig] = None


# ---- pretraining text --------------------------------------------------------------------------
TOKENIZE_CHUNK_CHARS = 2_000_000  # ~1.5 s of tokenizing on 2 cores; 1M measured ~10% slower (idle cores at each end)
INSTRUCTION_CHUNK = 256  # instruction records between progress reports


def _chunks(texts: list[str], chunk_chars: int) -> Iterator[tuple[int, int]]:
    """`(start, stop)` ranges of `texts` that each hold about `chunk_chars` characters
    (one text at least), covering all of them in order."""
    start, size = 0, 0
    for index, text in enumerate(texts):
        size += len(text)
        if size >= chunk_chars:
            yield start, index + 1
            start, size = index + 1, 0
    if start < len(texts):
        yield start, len(texts)


def _tokenize(texts: list[str], tokenizer, num_proc: int, piece_chars: int = 1_000_000,
              progress: Optional[Callable[[int, int], None]] = None) -> list:
    """Token ids of each text, encoded a chunk of texts at a time with `progress(done,
    total)` (texts) after each chunk. A process pool (`num_proc` > 1) takes chunks 16
    times larger per process, so starting its workers stays a small part of the time."""
    chunk_chars = TOKENIZE_CHUNK_CHARS * (16 * num_proc if num_proc > 1 else 1)
    token_lists = []
    for start, stop in _chunks(texts, chunk_chars):
        token_lists.extend(_tokenize_chunk(texts[start:stop], tokenizer, num_proc, piece_chars))
        if progress is not None:
            progress(stop, len(texts))
    return token_lists


def _tokenize_chunk(texts: list[str], tokenizer, num_proc: int, piece_chars: int) -> list:
    """Token ids of each text; a text longer than `piece_chars` is encoded piece by piece
    into a numpy array, so memory stays bounded however long a single line is."""
    if any(len(text) > piece_chars for text in texts):
        return [np.concatenate([np.asarray(tokenizer(piece, add_special_tokens=False)["input_ids"], dtype=np.int32)
                                for piece in pieces(text, piece_chars)])
                if len(text) > piece_chars else tokenizer(text, add_special_tokens=False)["input_ids"]
                for text in texts]
    if num_proc > 1 and len(texts) > num_proc:
        import datasets

        datasets.disable_progress_bars()
        table = datasets.Dataset.from_dict({"text": texts})
        table = table.map(lambda batch: {"ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
                          batched=True, num_proc=num_proc, remove_columns=["text"])
        return list(table["ids"])
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _clean(documents: list[str], config: DataConfig, report: QualityReport) -> list[str]:
    report.documents_read = len(documents)
    kept, seen = [], set()
    for document in documents:
        if not document.strip():
            report.empty_dropped += 1
            continue
        if config.dedupe:
            key = hashlib.blake2b(document.encode("utf-8", errors="replace"), digest_size=16).digest()
            if key in seen:
                report.duplicates_dropped += 1
                continue
            seen.add(key)
        kept.append(document)
    report.documents_kept = len(kept)
    return kept


def _length_stats(lengths: list[int], report: QualityReport) -> None:
    if lengths:
        array = np.asarray(lengths)
        report.length_mean = float(array.mean())
        report.length_p50 = float(np.percentile(array, 50))
        report.length_p95 = float(np.percentile(array, 95))
        report.length_max = int(array.max())


def _split_documents(lengths: list[int], config: DataConfig, min_val_tokens: int) -> np.ndarray:
    """A boolean mask of validation documents: a seeded random `val_fraction` of them,
    grown until they hold at least `min_val_tokens` tokens."""
    count = len(lengths)
    order = np.random.default_rng(config.seed).permutation(count)
    is_val = np.zeros(count, dtype=bool)
    wanted = max(1, round(config.val_fraction * count))
    tokens = 0
    for taken, index in enumerate(order):
        if taken >= wanted and tokens >= min_val_tokens:
            break
        if taken >= count - 1:  # always leave at least one training document
            break
        is_val[index] = True
        tokens += lengths[index] + 1
    return is_val


def _pack(token_lists: list[list[int]], eot: int, dtype) -> np.ndarray:
    """Documents joined with an end-of-text token between them (and before the first,
    so every document starts after a separator)."""
    total = sum(len(ids) + 1 for ids in token_lists)
    stream = np.empty(total, dtype=dtype)
    position = 0
    for ids in token_lists:
        stream[position] = eot
        stream[position + 1:position + 1 + len(ids)] = ids
        position += len(ids) + 1
    return stream


def build_pretraining(documents: list[str], tokenizer, config: DataConfig, seq_len: int, report: QualityReport,
                      progress: Optional[Callback] = None) -> tuple[PackedBlocks, PackedBlocks]:
    documents = _clean(documents, config, report)
    if not documents:
        raise DataError(f"{config.source}: no documents left after dropping {report.empty_dropped} empty "
                        f"and {report.duplicates_dropped} duplicate ones")
    token_lists = _tokenize(documents, tokenizer, config.num_proc, config.piece_chars,
                            progress_reporter("tokenizing documents", "documents", progress))
    if config.token_budget is not None:
        total, keep = 0, 0
        for keep, ids in enumerate(token_lists, start=1):
            total += len(ids) + 1
            if total >= config.token_budget:
                break
        token_lists = token_lists[:keep]
        report.notes.append(f"token budget {config.token_budget:,}: kept the first {keep} documents")
    lengths = [len(ids) for ids in token_lists]
    _length_stats(lengths, report)
    needed = 2 * (seq_len + 1)
    if sum(lengths) + len(lengths) < needed + 1:
        raise DataError(f"{config.source}: {sum(lengths):,} tokens is too small for sequences of {seq_len} tokens; "
                        f"need at least {needed + 1:,} (one training and one validation block)")
    if len(token_lists) == 1:  # one document (e.g. a single .txt): hold out its end instead
        ids = token_lists[0]
        cut = len(ids) - max(seq_len + 2, round(config.val_fraction * len(ids)))
        token_lists, lengths = [ids[:cut], ids[cut:]], [cut, len(ids) - cut]
        report.notes.append("one document: validation is its last "
                            f"{lengths[1]:,} tokens (a document-level split needs two or more documents; "
                            "txt_unit=paragraph makes one per paragraph)")
        is_val = np.array([False, True])  # the head trains, the tail validates
    else:
        is_val = _split_documents(lengths, config, min_val_tokens=seq_len + 2)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    eot = tokenizer.eos_token_id
    train_stream = _pack([ids for ids, v in zip(token_lists, is_val) if not v], eot, dtype)
    val_stream = _pack([ids for ids, v in zip(token_lists, is_val) if v], eot, dtype)
    train, val = PackedBlocks.from_stream(train_stream, seq_len), PackedBlocks.from_stream(val_stream, seq_len)
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"{config.source}: too small to give both a training and a validation block of "
                        f"{seq_len + 1} tokens ({len(train_stream):,} training, {len(val_stream):,} validation tokens)")
    report.train_documents, report.val_documents = int((~is_val).sum()), int(is_val.sum())
    report.train_tokens, report.val_tokens = len(train_stream), len(val_stream)
    report.train_blocks, report.val_blocks = len(train), len(val)
    return train, val


def held_out_text(config: DataConfig, tokenizer, seq_len: int, sequences: int) -> PackedBlocks:
    """Up to `sequences` blocks of `seq_len` tokens of general text from the documents
    `config`'s split holds out first (its seeded validation order), so a model Sprat
    pretrained on the same source never trained on them: what a fine-tune's guard
    measures. The documents chosen are cached as text (reading a large source is slow)."""
    return _split_text(config, tokenizer, seq_len, sequences, held_out=True)


def training_side_text(config: DataConfig, tokenizer, seq_len: int, sequences: int) -> PackedBlocks:
    """Like `held_out_text`, from the documents the split trains on instead: general text
    a fine-tune replays without ever touching what its guard measures."""
    return _split_text(config, tokenizer, seq_len, sequences, held_out=False)


def _split_text(config: DataConfig, tokenizer, seq_len: int, sequences: int, held_out: bool) -> PackedBlocks:
    side = "held_out" if held_out else "training_side"
    cache = Path(config.cache_dir) / side / \
        f"{source_fingerprint(config)}-{config.seed}-{config.val_fraction}-{sequences * (seq_len + 1)}.json"
    if cache.exists():
        texts = json.loads(cache.read_text(encoding="utf-8"))
    else:
        items, report = read_source(dataclasses.replace(config, format="auto"))
        if items and isinstance(items[0], dict):
            raise DataError(f"{config.source}: instruction records; general text must be plain text")
        documents = _clean(items, config, report)
        if not documents:
            raise DataError(f"{config.source}: no general text")
        wanted_chars = 8 * sequences * (seq_len + 1)  # ~8 characters a token, generously
        if len(documents) == 1:  # one document: the split holds out its tail
            text = documents[0]
            cut = len(text) - max(1, round(config.val_fraction * len(text)))
            texts = [text[-wanted_chars:] if held_out else text[:min(cut, wanted_chars)]]
        else:
            in_val = max(1, round(config.val_fraction * len(documents)))
            order = np.random.default_rng(config.seed).permutation(len(documents))
            texts, chars = [], 0
            for index in order[:in_val] if held_out else order[in_val:]:
                texts.append(documents[index])
                chars += len(documents[index])
                if chars >= wanted_chars:
                    break
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(f".{cache.name}.{os.getpid()}")
        partial.write_text(json.dumps(texts), encoding="utf-8")
        os.replace(partial, cache)
    token_lists = _tokenize(texts, tokenizer, 1, config.piece_chars)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    stream = _pack(token_lists, tokenizer.eos_token_id, dtype)[:sequences * (seq_len + 1) + 1]
    blocks = PackedBlocks.from_stream(stream, seq_len)
    if len(blocks) == 0:
        raise DataError(f"{config.source}: too little {'held-out' if held_out else 'training-side'} text for one "
                        f"block of {seq_len + 1} tokens")
    return blocks


# ---- instruction data --------------------------------------------------------------------------
def to_messages(record: dict) -> list[dict]:
    """Alpaca, prompt/response and messages records as a list of chat messages."""
    if isinstance(record.get("messages"), list):
        messages = record["messages"]
        for number, message in enumerate(messages, start=1):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise DataError(f"message {number} needs 'role' and 'content', got {message!r}")
        return [{"role": m["role"], "content": str(m["content"])} for m in messages]
    if "instruction" in record:
        prompt = str(record["instruction"])
        if record.get("input"):
            prompt += "\n\n" + str(record["input"])
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(record["output"])}]
    response = record.get("response", record.get("completion"))
    return [{"role": "user", "content": str(record["prompt"])}, {"role": "assistant", "content": str(response)}]


def encode_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and labels that keep only assistant tokens (-100 elsewhere)."""
    def render(upto: int, generation_prompt: bool) -> list[int]:
        if upto == 0:
            return []
        text = tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = render(len(messages), False)
    labels = [-100] * len(ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, through = render(index, True), render(index + 1, False)
        if ids[:len(prompt)] != prompt or ids[:len(through)] != through:
            raise DataError("the tokenizer's chat template does not render conversations prefix by prefix")
        labels[len(prompt):len(through)] = ids[len(prompt):len(through)]
    return ids, labels


def instruction_lengths(config: DataConfig, tokenizer) -> list[int]:
    """Tokens per instruction record of `config.source` (prompt and answer, as rendered by
    the tokenizer's chat template): what a fine-tune's sequence length is chosen from."""
    config, _ = resolve_source(config, fallback_to_builtin=False)
    items, _ = read_source(config)
    lengths = []
    for number, record in enumerate(items, start=1):
        if not isinstance(record, dict):
            raise DataError(f"{config.source}: plain text, but fine-tuning needs instruction records")
        try:
            lengths.append(len(encode_chat(to_messages(record), tokenizer)[0]))
        except DataError as error:
            raise DataError(f"{config.source}, record {number}: {error}") from None
    return lengths


def build_instruction(records: list[dict], tokenizer, config: DataConfig, seq_len: int, report: QualityReport,
                      progress: Optional[Callback] = None) -> tuple[MaskedSamples, MaskedSamples]:
    report.format = "instruction"
    report.documents_read = report.documents_kept = len(records)
    pad = tokenizer.pad_token_id
    rows_in, rows_out, lengths = [], [], []
    report_progress = progress_reporter("tokenizing instruction records", "records", progress)
    for number, record in enumerate(records, start=1):
        if number % INSTRUCTION_CHUNK == 1 and number > 1:
            report_progress(number - 1, len(records))
        try:
            ids, labels = encode_chat(to_messages(record), tokenizer)
        except DataError as error:
            raise DataError(f"{config.source}, record {number}: {error}") from None
        lengths.append(len(ids))
        if not any(message["content"].strip() for message in to_messages(record) if message["role"] == "assistant"):
            report.empty_dropped += 1  # nothing to learn from: the loss would be on the end token alone
            continue
        if len(ids) > seq_len + 1:
            if config.overlong == "drop":
                report.dropped_samples += 1
                continue
            ids, labels = ids[:seq_len + 1], labels[:seq_len + 1]
            report.truncated_samples += 1
        targets = labels[1:]
        if all(t == -100 for t in targets):  # nothing of the response survived truncation
            report.dropped_samples += 1
            continue
        inputs = ids[:-1]
        rows_in.append(inputs + [pad] * (seq_len - len(inputs)))
        rows_out.append(targets + [-100] * (seq_len - len(targets)))
    report_progress(len(records), len(records))
    _length_stats(lengths, report)
    report.documents_kept = len(rows_in)
    if report.empty_dropped:
        report.notes.append(f"skipped {report.empty_dropped} record(s) with an empty response")
    if report.truncated_samples:
        report.notes.append(f"{report.truncated_samples} record(s) longer than {seq_len + 1} tokens were cut to it "
                            f"(data.overlong=drop skips them instead)")
    if len(rows_in) < 2:
        raise DataError(f"{config.source}: {len(rows_in)} usable instruction sample(s) after dropping "
                        f"{report.dropped_samples + report.empty_dropped}; need at least 2 (one for validation)")
    inputs, targets = np.asarray(rows_in, dtype=np.int32), np.asarray(rows_out, dtype=np.int32)
    is_val = _split_documents([1] * len(inputs), config, min_val_tokens=1)
    report.train_documents, report.val_documents = int((~is_val).sum()), int(is_val.sum())
    report.train_tokens = int((targets[~is_val] != -100).sum())
    report.val_tokens = int((targets[is_val] != -100).sum())
    report.train_blocks, report.val_blocks = report.train_documents, report.val_documents
    return MaskedSamples(inputs[~is_val], targets[~is_val]), MaskedSamples(inputs[is_val], targets[is_val])


# ---- the whole pipeline ---------------------------------------------------------------------------
def prepare(config: DataConfig, seq_len: int, tokenizer=None, fallback_to_builtin: bool = False,
            progress: Optional[Callback] = None) -> PreparedData:
    """Read, tokenize, split and pack `config`'s data for sequences of `seq_len` tokens.
    A second call with the same source, tokenizer and settings loads the arrays from the
    cache. `tokenizer` overrides `config.tokenizer` (e.g. a fine-tuned base's).
    Tokenizing sends `Progress` events (documents or records done of all) to `progress`."""
    started = time.perf_counter()
    config, fallback_note = resolve_source(config, fallback_to_builtin)
    cache = Path(config.cache_dir)
    fingerprint = source_fingerprint(config)
    if tokenizer is None and config.tokenizer != "bpe":
        tokenizer = load_pretrained_tokenizer(config.tokenizer, config.hub_timeout_s)
    bpe_file = cache / "tokenizers" / f"{fingerprint}-{config.vocab_size}-{config.bpe_sample_bytes}.json"
    if tokenizer is None and bpe_file.exists():
        tokenizer = load_tokenizer_dir(bpe_file)
    if tokenizer is not None:
        arrays = cache / "arrays" / f"{fingerprint}-{tokenizer_hash(tokenizer)}-{seq_len}"
        if (arrays / "report.json").exists():
            prepared = _load_arrays(arrays, tokenizer, fingerprint, started)
            prepared.report.notes += [fallback_note] if fallback_note else []
            prepared.config = config
            return prepared

    items, report = read_source(config)
    report.notes += [fallback_note] if fallback_note else []
    if not items:
        raise DataError(f"{config.source}: the dataset is empty")
    instruction = isinstance(items[0], dict)
    trained_bpe = tokenizer is None
    if trained_bpe:
        texts = (json.dumps(item) if isinstance(item, dict) else item for item in items)
        tokenizer = train_bpe(texts, config.vocab_size, config.bpe_sample_bytes, config.piece_chars)
        bpe_file.parent.mkdir(parents=True, exist_ok=True)
        partial = bpe_file.with_name(f".{bpe_file.name}.{os.getpid()}")
        tokenizer.backend_tokenizer.save(str(partial))
        os.replace(partial, bpe_file)  # atomic: concurrent runs never read half a file
    if instruction:
        train, val = build_instruction(items, tokenizer, config, seq_len, report, progress)
    else:
        train, val = build_pretraining(items, tokenizer, config, seq_len, report, progress)
    report.seconds = time.perf_counter() - started
    arrays = cache / "arrays" / f"{fingerprint}-{tokenizer_hash(tokenizer)}-{seq_len}"
    _save_arrays(arrays, train, val, report)
    if trained_bpe:  # said this time only: the cached report is read back by later runs
        report.notes.append(f"{TRAINED_BPE_NOTE} {len(tokenizer)}-token byte-level BPE on the data (cached for later "
                            f"runs)")
    return PreparedData(tokenizer, train, val, report, fingerprint, config)


def _save_arrays(directory: Path, train, val, report: QualityReport) -> None:
    temporary = directory.with_name(directory.name + f".tmp{os.getpid()}")
    temporary.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("val", val)):
        if isinstance(part, PackedBlocks):
            np.save(temporary / f"{name}_tokens.npy", part.tokens)
        else:
            np.save(temporary / f"{name}_inputs.npy", part.inputs)
            np.save(temporary / f"{name}_targets.npy", part.targets)
    (temporary / "report.json").write_text(json.dumps(dataclasses.asdict(report), indent=2))
    if directory.exists():  # another process won the race; theirs is equivalent
        import shutil

        shutil.rmtree(temporary, ignore_errors=True)
        return
    temporary.rename(directory)


def _load_arrays(directory: Path, tokenizer, fingerprint: str, started: float) -> PreparedData:
    report = QualityReport(**json.loads((directory / "report.json").read_text()))
    # Caches written before the note was kept out of them say a BPE was trained: not this time.
    report.notes = [note for note in report.notes if not note.startswith(TRAINED_BPE_NOTE)]
    parts = []
    for name in ("train", "val"):
        packed = directory / f"{name}_tokens.npy"
        if packed.exists():
            tokens = np.load(packed)
            parts.append(PackedBlocks(tokens, tokens.shape[1] - 1))
        else:
            parts.append(MaskedSamples(np.load(directory / f"{name}_inputs.npy"),
                                       np.load(directory / f"{name}_targets.npy")))
    report.cached = True
    report.seconds = time.perf_counter() - started
    return PreparedData(tokenizer, parts[0], parts[1], report, fingerprint)
