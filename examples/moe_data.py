"""Data for the MoE pretraining example: real text -> byte tokens -> Megatron's indexed dataset.

The text is either Python's own standard-library sources (every machine that runs this script
has them, so nothing is downloaded) or the user's file: plain text (documents separated by blank
lines), JSONL (one JSON object per line, the text under a key) or an existing Megatron indexed
dataset prefix (PREFIX.bin + PREFIX.idx, token ids below 257). Tokens are bytes (0..255) plus one
end-of-document token. The dataset is written once with Megatron's IndexedDatasetBuilder into a
cache folder (atomically: a partly written cache is never used) and read back through Megatron's
GPTDataset / BlendedMegatronDatasetBuilder, which do the shuffling and the sample packing.
Batches maps (step, micro-batch, data-parallel rank) to samples, the same whatever the number of
processes.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sysconfig

import numpy

EOD = 256
VOCAB_SIZE = 257  # 256 byte values + end-of-document


class DataError(ValueError):
    """A data path or data file that cannot be used; the message says which and why."""


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus one end-of-document token (id 256).

    Duck-types the parts of Megatron's tokenizer that GPTDataset reads (vocab_size, eod and
    unique_identifiers, which goes into the dataset cache's description).
    """

    vocab_size = VOCAB_SIZE
    eod = EOD
    unique_identifiers = {"class": "ByteTokenizer", "vocab_size": VOCAB_SIZE, "eod": EOD}

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def stdlib_files() -> list[str]:
    """The top-level modules of this interpreter's standard library, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    if not files:
        raise DataError(f"data: no Python standard-library sources found under {root!r}; "
                        "pass --data-path with a text or JSONL file instead")
    return files


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def iter_documents(source: str, *, max_bytes: int, json_key: str = "text"):
    """Yield documents (str) from `source` until about max_bytes of text have been produced.

    source: "stdlib", a .jsonl/.json file, or any other text file.
    """
    produced = 0
    if source == "stdlib":
        for path in stdlib_files():
            if produced >= max_bytes:
                return
            text = _read_text(path)
            produced += len(text)
            yield text
        return
    if not os.path.exists(source):
        raise DataError(f"--data-path {source!r}: no such file (expected a .txt or .jsonl file, "
                        "or the prefix of a Megatron indexed dataset PREFIX.bin/PREFIX.idx)")
    if os.path.isdir(source):
        raise DataError(f"--data-path {source!r} is a directory; pass a .txt or .jsonl file")
    if source.endswith((".jsonl", ".json")):
        with open(source, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if produced >= max_bytes:
                    return
                line = raw.decode("utf-8", errors="replace").strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"--data-path {source!r} line {lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or json_key not in obj:
                    raise DataError(f"--data-path {source!r} line {lineno}: expected a JSON object "
                                    f"with a {json_key!r} key (set data.json_key for another key)")
                text = obj[json_key]
                if not isinstance(text, str):
                    raise DataError(f"--data-path {source!r} line {lineno}: {json_key!r} is "
                                    f"{type(text).__name__}, expected a string")
                produced += len(text)
                yield text
        return
    text = _read_text(source)
    # Paragraphs (blank-line separated) are the documents of a plain text file.
    for doc in re.split(r"\n\s*\n", text):
        if produced >= max_bytes:
            return
        if doc.strip():
            produced += len(doc)
            yield doc


def _fingerprint(source: str, max_bytes: int, json_key: str) -> str:
    h = hashlib.sha256(f"v1|{max_bytes}|{json_key}|".encode())
    files = stdlib_files() if source == "stdlib" else [source]
    for path in files:
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def is_indexed_prefix(source: str) -> bool:
    return os.path.isfile(source + ".bin") and os.path.isfile(source + ".idx")


def build_indexed_dataset(source: str, cache_dir: str, *, max_bytes: int, json_key: str = "text") -> str:
    """Tokenize `source` into Megatron's indexed format under cache_dir; return the path prefix.

    Reuses a complete earlier build of the same input. Written atomically: .bin and .idx go to
    temporary names and are renamed into place, .idx last, so a prefix whose .idx exists is whole.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    if source != "stdlib" and is_indexed_prefix(source):
        check_indexed_prefix(source)
        return source
    if max_bytes <= 0:
        raise DataError(f"data.max_bytes must be positive, got {max_bytes}")
    name = "stdlib" if source == "stdlib" else re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(source))
    if source != "stdlib" and not os.path.isfile(source):
        list(iter_documents(source, max_bytes=1, json_key=json_key))  # raises the clear error
    prefix = os.path.join(cache_dir, f"{name}-{_fingerprint(source, max_bytes, json_key)}")
    if os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin"):
        return prefix
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=numpy.uint16)
    n_docs = n_tokens = 0
    for doc in iter_documents(source, max_bytes=max_bytes, json_key=json_key):
        ids = numpy.frombuffer(doc.encode("utf-8") + b"\0", dtype=numpy.uint8).astype(numpy.uint16)
        ids[-1] = EOD  # the same ids as tokenize(doc) + [EOD], without a Python list
        builder.add_document(ids, [len(ids)])
        n_docs += 1
        n_tokens += len(ids)
    builder.finalize(tmp + ".idx")
    if n_docs == 0:
        for ext in (".bin", ".idx"):
            os.remove(tmp + ext)
        raise DataError(f"--data-path {source!r}: no text found (empty file?)")
    for ext in (".bin", ".idx"):
        with open(tmp + ext, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp + ext, prefix + ext)
    return prefix


def check_indexed_prefix(prefix: str) -> None:
    """An existing indexed dataset must hold byte-tokenizer ids (< VOCAB_SIZE)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    top = 0
    for i in range(len(ds)):
        seq = ds[i]
        if len(seq):
            top = max(top, int(seq.max()))
    if top >= VOCAB_SIZE:
        raise DataError(f"--data-path {prefix!r}: token id {top} does not fit the byte tokenizer "
                        f"(vocabulary {VOCAB_SIZE}); this example trains byte-level models only")


def build_gpt_dataset(prefix: str, *, seq_length: int, num_samples: int, seed: int):
    """Megatron's GPTDataset over `prefix`, `num_samples` samples of seq_length tokens (all train)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([prefix], None),
        split="100,0,0",
        tokenizer=ByteTokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal mask comes from the attention itself
        path_to_cache=None,  # small data: indices are rebuilt in memory, deterministically
    )
    train, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_samples, None, None], lambda: True, config).build()
    if train is None or len(train) < num_samples:
        raise DataError(f"data {prefix!r}: could not draw {num_samples} samples of {seq_length} tokens")
    return train


def build_dataset(source: str, cache_dir: str, *, data_cfg: dict, seq_length: int, num_samples: int, seed: int,
                  is_main: bool, barrier) -> tuple[str, object]:
    """(indexed-dataset prefix, GPTDataset). Rank 0 tokenizes (once, cached); the other ranks
    wait at barrier() and then find the cache built."""
    def indexed():
        return build_indexed_dataset(source, cache_dir, max_bytes=data_cfg["max_bytes"], json_key=data_cfg["json_key"])

    prefix = indexed() if is_main else None
    barrier()
    if not is_main:
        prefix = indexed()
    return prefix, build_gpt_dataset(prefix, seq_length=seq_length, num_samples=num_samples, seed=seed)


class Batches:
    """Global step s, micro-batch j, data-parallel rank r -> the same samples whatever the
    number of processes: sample ids s*G + j*(b*D) + r*b + [0, b) (G global, b micro batch, D dp)."""

    def __init__(self, dataset, train_cfg: dict, dp_rank: int, dp_size: int, device: str):
        self.dataset, self.device = dataset, device
        self.gbs, self.mbs = train_cfg["global_batch_size"], train_cfg["micro_batch_size"]
        self.dp_rank, self.dp = dp_rank, dp_size
        self.num_micro = self.gbs // (self.mbs * dp_size)

    def get(self, step: int, micro: int) -> dict:
        import torch

        start = step * self.gbs + micro * self.mbs * self.dp + self.dp_rank * self.mbs
        items = [self.dataset[start + k] for k in range(self.mbs)]
        batch = {key: torch.stack([it[key] for it in items])
                 for key in ("tokens", "labels", "loss_mask", "position_ids")}
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
