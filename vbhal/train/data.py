"""Training data with no download: byte-level tokens from local files.

* Default corpus: the Python standard library's own ``*.py`` sources on the running machine
  (``sysconfig.get_paths()["stdlib"]``, site-packages excluded), in sorted path order, so the same
  Python install always gives the same corpus. It is capped (``max_bytes``) so that a tiny run starts
  in a second; the cap takes whole files in sorted order until the budget is reached.
* ``--data PATH``: text files or folders of them (``.txt .md .py .rst .json .csv ...``, any file that
  decodes as UTF-8), JSONL files with a ``"text"`` field per line, or a pre-tokenised ``uint16``
  ``.bin`` memmap (``<name>.bin``, plus an optional ``<name>.val.bin`` validation split).
* Tokenizer: the 256 byte values, plus ``EOS_ID`` (256) after every document. Decoding drops
  ids >= 256. No vocabulary file, nothing to download.
* Split: deterministic, by document: every ``VAL_EVERY``-th document (index % VAL_EVERY ==
  VAL_EVERY // 2) goes to validation, so both splits see the whole range of the corpus. With fewer
  than 2 * VAL_EVERY documents, or when that split holds under 1% or over 15% of the tokens (or a
  .bin without a .val.bin), the last 5% of the tokens are held out instead.
* Cache: tokens are written once to ``~/.cache/vbhal/corpus-<key>.{train,val}.bin`` (uint16), where
  the key hashes the file list, their sizes and mtimes and the cap; later runs memmap them.
  ``VBHAL_CACHE_DIR`` moves the cache.
* Samples: the training split is cut into non-overlapping windows of ``seq_length + 1`` tokens
  (``x = w[:-1]``, ``y = w[1:]``) starting every ``seq_length`` tokens. **An epoch is one pass over
  those windows** in a shuffled order that depends only on (seed, epoch), so a run is reproducible
  and resumable at any step.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from vbhal.train._errors import DataError

__all__ = ["BYTE_VOCAB", "EOS_ID", "VAL_EVERY", "encode", "decode", "Corpus", "load_corpus",
           "stdlib_files", "TokenWindows", "ResumableSampler", "make_loader", "loader_settings",
           "cache_dir"]

BYTE_VOCAB = 256          # token ids 0..255 are the byte values
EOS_ID = 256              # end of document, appended after every file / JSONL record
VAL_EVERY = 20            # one document in 20 goes to validation (5%)
VAL_FRACTION_SINGLE = 0.05
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".csv", ".tsv", ".html", ".xml", ".yaml",
                 ".yml", ".toml", ".c", ".h", ".cpp", ".js", ".ts", ".sh", ".tex", ""}
_CACHE_VERSION = 1


def encode(text: str | bytes) -> list[int]:
    """Bytes of `text` (UTF-8) as token ids; no EOS is added."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return list(data)


def decode(ids: Iterable[int], stop_at_eos: bool = True) -> str:
    """Token ids back to text; stops at EOS (if asked), drops other non-byte ids, replaces bad UTF-8."""
    out = bytearray()
    for i in ids:
        i = int(i)
        if i == EOS_ID and stop_at_eos:
            break
        if 0 <= i < BYTE_VOCAB:
            out.append(i)
    return out.decode("utf-8", errors="replace")


def cache_dir() -> Path:
    return Path(os.environ.get("VBHAL_CACHE_DIR", Path.home() / ".cache" / "vbhal"))


def stdlib_files() -> list[Path]:
    """The standard library's ``*.py`` files, sorted by path relative to the stdlib root."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if "site-packages" not in p.parts and "dist-packages" not in p.parts and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@dataclass
class Corpus:
    """Token ids of the two splits (uint16 arrays, usually memmaps) and where they came from."""

    train: np.ndarray
    val: np.ndarray
    source: str
    num_documents: int

    @property
    def num_train_tokens(self) -> int:
        return int(self.train.shape[0])

    @property
    def num_val_tokens(self) -> int:
        return int(self.val.shape[0])


# ---------------------------------------------------------------------------------------------
# Reading sources
# ---------------------------------------------------------------------------------------------

def _collect_text_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted((f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                            and f.suffix.lower() in TEXT_SUFFIXES | {".jsonl"}),
                           key=lambda f: f.as_posix())
            files.extend(found)
        else:
            files.append(p)
    return files


def _documents_from_file(path: Path) -> Iterator[bytes]:
    """One document per file, or one per JSONL line (its "text" field)."""
    if path.suffix.lower() == ".jsonl":
        with open(path, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); JSONL needs one "
                                    f"JSON object per line with a \"text\" field.") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataError(f"{path}:{lineno}: a JSONL record needs a string \"text\" field, "
                                    f"got keys {sorted(record) if isinstance(record, dict) else type(record).__name__}.")
                yield record["text"].encode("utf-8")
        return
    data = path.read_bytes()
    if b"\x00" in data[:4096]:
        raise DataError(f"{path} looks binary (NUL bytes). Pass text files, JSONL, or a uint16 .bin "
                        f"of token ids.")
    yield data


def _fingerprint(files: list[Path], extra: str) -> str:
    h = hashlib.sha256(f"v{_CACHE_VERSION}|{extra}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _tokenize_documents(docs: Iterable[bytes], max_bytes: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Concatenate docs (+EOS) into train and val token arrays, split by document index."""
    train_parts: list[np.ndarray] = []
    val_parts: list[np.ndarray] = []
    eos = np.array([EOS_ID], dtype=np.uint16)
    total = 0
    n = 0
    for doc in docs:
        if max_bytes is not None and total >= max_bytes:
            break
        if max_bytes is not None and total + len(doc) > max_bytes and n > 0:
            break  # whole documents only; the first one is always taken (then cut below)
        if max_bytes is not None and len(doc) > max_bytes:
            doc = doc[:max_bytes]
        arr = np.frombuffer(doc, dtype=np.uint8).astype(np.uint16)
        target = val_parts if n % VAL_EVERY == VAL_EVERY // 2 else train_parts
        target.append(arr)
        target.append(eos)
        total += len(doc)
        n += 1
    if n == 0 or total == 0:
        return np.zeros(0, np.uint16), np.zeros(0, np.uint16), n
    train = np.concatenate(train_parts) if train_parts else np.zeros(0, np.uint16)
    val = np.concatenate(val_parts) if val_parts else np.zeros(0, np.uint16)
    val_share = val.size / max(1, train.size + val.size)
    if n < 2 * VAL_EVERY or not 0.01 <= val_share <= 0.15:
        # Too few documents, or an unlucky split (one huge validation file): hold out the last
        # 5% of the tokens instead.
        allt = np.concatenate([train, val])
        cut = int(round(allt.size * (1 - VAL_FRACTION_SINGLE)))
        train, val = allt[:cut], allt[cut:]
    return train, val, n


def _write_bin(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(arr.astype(np.uint16).tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _memmap(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r")


def _load_bin(path: Path) -> Corpus:
    if path.stat().st_size % 2:
        raise DataError(f"{path} has an odd number of bytes; a .bin corpus must be uint16 token ids "
                        f"(2 bytes each, native little-endian).")
    tokens = _memmap(path)
    if tokens.size == 0:
        raise DataError(f"{path} is empty; it holds no tokens.")
    val_path = path.with_name(path.name[:-len(".bin")] + ".val.bin")
    if val_path.exists():
        return Corpus(tokens, _memmap(val_path), source=str(path), num_documents=1)
    cut = int(round(tokens.size * (1 - VAL_FRACTION_SINGLE)))
    return Corpus(tokens[:cut], tokens[cut:], source=str(path), num_documents=1)


def load_corpus(data: str | os.PathLike | list | None = None, *, max_bytes: int | None = None,
                use_cache: bool = True, log=None) -> Corpus:
    """Build or load the token corpus.

    data: None (the stdlib sources), a path or a list of paths (files, folders, .jsonl, or one
    uint16 .bin). max_bytes caps the text read (whole documents, sorted order). Raises `DataError`
    for a missing path or an empty corpus.
    """
    if data is None:
        files = stdlib_files()
        if not files:
            raise DataError(f"found no *.py files under the standard library "
                            f"({sysconfig.get_paths()['stdlib']}); pass --data PATH.")
        source = f"python-stdlib:{sysconfig.get_paths()['stdlib']}"
    else:
        paths = [Path(p).expanduser() for p in (data if isinstance(data, (list, tuple)) else [data])]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise DataError(f"data path(s) not found: {', '.join(missing)}. Pass existing text files, "
                            f"folders, .jsonl files or a uint16 .bin (or omit --data for the built-in "
                            f"stdlib corpus).")
        bins = [p for p in paths if p.suffix == ".bin"]
        if bins:
            if len(paths) != 1:
                raise DataError("a pre-tokenised .bin must be the only --data path.")
            return _load_bin(bins[0])
        files = _collect_text_files(paths)
        if not files:
            raise DataError(f"no text files found in {', '.join(map(str, paths))} (looked for "
                            f"{', '.join(sorted(s for s in TEXT_SUFFIXES if s))}, .jsonl).")
        source = ",".join(str(p) for p in paths)

    if data is None and max_bytes is not None:
        # Only the files that fit in the cap take part (and in the cache key): a tiny run need not
        # stat the whole stdlib.
        # Whole files in sorted order, skipping any that would overflow the cap (so one big file
        # does not end the list early and the split still has many documents).
        kept, total = [], 0
        for f in files:
            size = f.stat().st_size
            if total + size > max_bytes:
                continue
            kept.append(f)
            total += size
            if total >= max_bytes * 0.98:
                break
        files = kept or files[:1]

    key = _fingerprint(files, f"{source}|cap={max_bytes}")
    cdir = cache_dir()
    train_path, val_path = cdir / f"corpus-{key}.train.bin", cdir / f"corpus-{key}.val.bin"
    meta_path = cdir / f"corpus-{key}.json"
    if use_cache and train_path.exists() and val_path.exists() and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            if (train_path.stat().st_size == 2 * meta["train_tokens"]
                    and val_path.stat().st_size == 2 * meta["val_tokens"]):
                return Corpus(_memmap(train_path), _memmap(val_path), source=source,
                              num_documents=meta["documents"])
        except (OSError, ValueError, KeyError):
            pass  # rebuild below

    def docs() -> Iterator[bytes]:
        for f in files:
            if data is None:
                yield f.read_bytes()
            else:
                yield from _documents_from_file(f)

    train, val, ndocs = _tokenize_documents(docs(), max_bytes)
    if train.size + val.size == 0:
        raise DataError(f"the corpus from {source} is empty (0 bytes of text); give files with content.")
    if use_cache:
        try:
            cdir.mkdir(parents=True, exist_ok=True)
            _write_bin(train_path, train)
            _write_bin(val_path, val)
            tmp = meta_path.with_name(meta_path.name + f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"source": source, "documents": ndocs, "train_tokens": int(train.size),
                                       "val_tokens": int(val.size), "max_bytes": max_bytes}))
            os.replace(tmp, meta_path)
            return Corpus(_memmap(train_path), _memmap(val_path), source=source, num_documents=ndocs)
        except OSError as exc:  # read-only home etc.: keep going from memory
            if log is not None:
                log(f"could not cache the corpus under {cdir} ({exc}); using it from memory.")
    return Corpus(train, val, source=source, num_documents=ndocs)


# ---------------------------------------------------------------------------------------------
# Dataset, sampler, loader
# ---------------------------------------------------------------------------------------------

class TokenWindows(Dataset):
    """Non-overlapping windows of ``seq_length + 1`` tokens; item i -> (x, y) int64 of seq_length."""

    def __init__(self, tokens: np.ndarray, seq_length: int, split: str = "train"):
        self.tokens = tokens
        self.seq_length = seq_length
        n = (int(tokens.shape[0]) - 1) // seq_length
        if n <= 0:
            raise DataError(f"the {split} split has {int(tokens.shape[0])} tokens, fewer than "
                            f"seq_length + 1 = {seq_length + 1}: lower --seq-length or give more data.")
        self.num_windows = n

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.seq_length
        w = torch.from_numpy(np.asarray(self.tokens[start:start + self.seq_length + 1], dtype=np.int64))
        return w[:-1], w[1:]


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` (shuffle by seed + epoch, rank-strided, drop_last) that can start part-way.

    ``start`` is a position in *global* samples already consumed this epoch (the sum over ranks);
    each rank skips ``start // num_replicas`` of its indices. Because DistributedSampler gives rank r
    the indices perm[r::W], the first ``k * W`` entries of the permutation are exactly what all ranks
    consumed in their first k samples, so a run resumed with a different world size (dividing
    ``start``) still continues at the same place of the permutation.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=True)
        self.start = 0

    def set_start(self, global_samples: int) -> None:
        if global_samples % self.num_replicas:
            raise DataError(f"cannot resume at global sample {global_samples} with {self.num_replicas} "
                            f"ranks (not divisible); resume with a world size that divides it.")
        self.start = global_samples // self.num_replicas

    def __iter__(self):
        it = super().__iter__()
        for _ in range(self.start):
            next(it, None)
        return it

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def loader_settings(device: torch.device, num_workers: int | None, local_world_size: int = 1) -> dict:
    """DataLoader keywords sized to the machine.

    On an accelerator: worker processes (a share of the CPU cores per local rank, at most 8),
    pinned memory, prefetch 4 batches per worker, persistent workers. On CPU-only runs the default is
    0 workers, because workers would take cores from the training math itself; pinning is off (it
    raises on CPU-only torch).
    """
    accel = device.type not in ("cpu", "meta")
    if num_workers is None:
        if accel:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            num_workers = max(1, min(8, cpus // max(1, local_world_size) - 1))
        else:
            num_workers = 0
    kw: dict = {"num_workers": num_workers, "pin_memory": accel and device.type == "cuda"}
    if num_workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=4)
    return kw


def _ignore_stop_signals(_worker_id: int) -> None:
    """Worker processes leave SIGINT/SIGTERM to the training process.

    Ctrl-C reaches the whole foreground process group and SLURM/`timeout` signal every process of a
    job; a worker that died of it would make the main process's graceful stop (finish the step, save,
    exit) fail with "DataLoader worker exited unexpectedly". Workers still exit when the main process
    goes away (PyTorch's worker watchdog).
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset: Dataset, batch_size: int, sampler=None, **settings) -> DataLoader:
    """A DataLoader with its own generator: creating an iterator would otherwise draw a worker seed
    from torch's global RNG, so a resumed run (one extra iter() call) would get different dropout
    masks than an uninterrupted one."""
    if settings.get("num_workers", 0) > 0:
        settings.setdefault("worker_init_fn", _ignore_stop_signals)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=True,
                      generator=torch.Generator().manual_seed(0), **settings)


def num_windows(tokens: int, seq_length: int) -> int:
    return max(0, (tokens - 1) // seq_length)


def epoch_tokens(corpus: Corpus, seq_length: int) -> int:
    """Tokens seen per epoch (the training windows, each seq_length predictions)."""
    return num_windows(corpus.num_train_tokens, seq_length) * seq_length


def bytes_human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover

