"""Embedding extraction: φ(x, chosen) and φ(x, rejected) for every pair, streamed to disk.

Speed comes from padding less: texts are tokenized once, sorted by length and cut into batches under a token
budget (`max_len × batch ≤ budget`), so a batch holds texts of nearly one length. Memory stays flat because
pairs are read and written one shard at a time. A shard is skipped on a rerun when its pairs and backbone are
unchanged, so an interrupted run resumes where it stopped.

Layout of an embedding folder:
    index.json               backbone, features (the feature spec, `rewardprism.features`), dim,
                             shards [{file, start, stop, fingerprint, tokens}], n_pairs
    shard-00000.safetensors  "chosen" (n, d) and "rejected" (n, d), float32
    pairs.jsonl.gz           the pairs themselves (groups, annotators and prompts for evaluation)
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from rewardprism.backbone import Backbone
from rewardprism.data import PreferencePair, load_pairs, render
from rewardprism.features import FeatureMismatch, FeatureSpec

T = TypeVar("T")
INDEX = "index.json"
PAIRS = "pairs.jsonl.gz"
# Padded tokens per forward batch when none is given. On CPU, batches that stay in cache are fastest: 2,048
# tokens ran MiniLM 1.3× and SmolLM2 1.75× faster than 16,384 here (bench/bench_embed.py). A GPU wants big batches.
CPU_TOKEN_BUDGET, GPU_TOKEN_BUDGET = 2048, 65536


def default_token_budget(device: torch.device) -> int:
    return GPU_TOKEN_BUDGET if device.type == "cuda" else CPU_TOKEN_BUDGET


def token_budget_batches(lengths: np.ndarray, token_budget: int, max_batch: int) -> list[np.ndarray]:
    """Indices of batches, longest first, each with `len(batch) × its longest ≤ token_budget`."""
    if token_budget < 1 or max_batch < 1:
        raise ValueError("token_budget and max_batch must be positive")
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, start = [], 0
    while start < len(order):
        size = max(1, min(max_batch, token_budget // max(int(lengths[order[start]]), 1)))
        batches.append(order[start:start + size])
        start += size
    return batches


class EmbeddingExtractor:
    """Batched, length-sorted forward passes of a backbone under `torch.inference_mode`."""

    def __init__(self, backbone: Backbone, token_budget: int | None = None, max_batch: int = 64,
                 on_batch: Callable[[int, int], None] | None = None):
        self.backbone, self.max_batch = backbone, max_batch
        self.token_budget = token_budget or default_token_budget(backbone.device)
        self.on_batch = on_batch  # (texts, real tokens) after each forward batch: a progress bar's steps

    def tokenize(self, texts: list[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids, cut at `max_length` (default: the backbone's) on the tokenizer's truncation side."""
        return self.backbone.tokenizer(texts, truncation=True, max_length=max_length or self.backbone.max_length,
                                       padding=False, return_attention_mask=False)["input_ids"]

    def embed_texts(self, texts: list[str], max_length: int | None = None) -> tuple[np.ndarray, int]:
        """(len(texts), d) float32 features in input order, and the number of real tokens read."""
        ids = self.tokenize(texts, max_length)
        return self.embed_ids(ids), sum(map(len, ids))

    @torch.inference_mode()
    def embed_ids(self, ids: list[list[int]]) -> np.ndarray:
        out = np.empty((len(ids), self.backbone.dim), dtype=np.float32)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        for batch in token_budget_batches(lengths, self.token_budget, self.max_batch):
            input_ids, mask = self.pad([ids[i] for i in batch])
            out[batch] = self.backbone(input_ids, mask).float().cpu().numpy()
            if self.on_batch is not None:
                self.on_batch(len(batch), int(lengths[batch].sum()))
        return out

    def pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids and mask, padded on the tokenizer's side, built directly on the backbone's device."""
        width = max(map(len, rows))
        tok = self.backbone.tokenizer
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        left = tok.padding_side == "left"
        for r, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            input_ids[r, span] = torch.tensor(row)
            mask[r, span] = 1
        device = self.backbone.device
        return input_ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)

    def embed_pairs(self, pairs: list[PreferencePair]) -> tuple[np.ndarray, np.ndarray, int]:
        """Chosen and rejected features, (n, d) each; both sides share one length-sorted pass."""
        tok = self.backbone.tokenizer
        texts = [render(p.prompt, p.chosen, tok) for p in pairs] + [render(p.prompt, p.rejected, tok)
                                                                    for p in pairs]
        feats, tokens = self.embed_texts(texts)
        return feats[:len(pairs)], feats[len(pairs):], tokens


def shard_fingerprint(backbone_name: str, max_length: int, pairs: list[PreferencePair]) -> str:
    h = hashlib.sha1(f"{backbone_name}|{max_length}".encode())
    for p in pairs:
        h.update(json.dumps(p.to_row(), sort_keys=True).encode())
    return h.hexdigest()


class ShardWriter:
    """Writes shards and the index atomically, so a crash never leaves a half-written shard listed."""

    def __init__(self, out_dir: str | Path, features: FeatureSpec, dim: int, dataset: str = ""):
        self.out = Path(out_dir)
        self.created = not self.out.exists()  # made by this run: removed again if the run writes nothing
        self.out.mkdir(parents=True, exist_ok=True)
        previous = json.loads((self.out / INDEX).read_text()) if (self.out / INDEX).exists() else {}
        # A folder written before specs were recorded has none: its shards' fingerprints still tell.
        same = previous.get("backbone") == features.backbone and previous.get("dim") == dim \
            and previous.get("features", features.to_dict()) == features.to_dict()
        self.done = {s["fingerprint"]: s for s in previous.get("shards", [])} if same else {}
        self.features = features
        self.index = {"backbone": features.backbone, "features": features.to_dict(), "dim": dim, "dataset": dataset,
                      "shards": [], "n_pairs": 0}

    def has(self, number: int, fingerprint: str) -> bool:
        old = self.done.get(fingerprint)
        return old is not None and old["file"] == _shard_name(number) and (self.out / old["file"]).exists()

    def reuse(self, fingerprint: str) -> None:
        self._add(self.done[fingerprint])

    def write(self, number: int, fingerprint: str, chosen: np.ndarray, rejected: np.ndarray,
              tokens: int) -> None:
        name = _shard_name(number)
        tmp = self.out / f".{name}.tmp"
        save_file({"chosen": np.ascontiguousarray(chosen), "rejected": np.ascontiguousarray(rejected)}, tmp)
        (self.out / PAIRS).unlink(missing_ok=True)  # no longer the pairs of these shards: rewritten at the end
        os.replace(tmp, self.out / name)
        self._add({"file": name, "start": 0, "stop": len(chosen), "fingerprint": fingerprint, "tokens": tokens})

    def _add(self, shard: dict) -> None:
        """Append a shard at the current end of the index (a reused shard keeps its size, not its offset)."""
        shard = {**shard, "start": self.index["n_pairs"],
                 "stop": self.index["n_pairs"] + shard["stop"] - shard["start"]}
        self.index["shards"].append(shard)
        self.index["n_pairs"] = shard["stop"]
        write_text_atomically(self.out / INDEX, json.dumps(self.index, indent=1))


def _shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def write_text_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never a part: written beside it, then renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


@dataclass
class EmbedReport:
    n_pairs: int
    tokens: int
    seconds: float
    shards_written: int
    shards_reused: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


EmbedChunks = Callable[[Iterator[list[PreferencePair]]], Iterator[tuple[np.ndarray, np.ndarray, int]]]


class EmbedProgress:
    """The `embedding` bar: pairs done of the total (when known), tokens/s and the ETA.

    Moved after every forward batch (half a pair per text: a batch mixes chosen and rejected texts) and set
    exactly at the end of each shard, so a slow machine shows steady progress instead of 0 for a whole shard.
    """

    def __init__(self, total: int | None, enabled: bool = True):
        self.bar = tqdm(total=total, unit="pair", desc="embedding", disable=not enabled, dynamic_ncols=True)
        self.start, self.pairs, self.tokens, self.shard_texts, self.shard_tokens = time.perf_counter(), 0, 0, 0, 0

    def batch(self, texts: int, tokens: int) -> None:
        self.shard_texts += texts
        self.shard_tokens += tokens
        self._show(self.pairs + self.shard_texts // 2)

    def shard(self, pairs: int, tokens: int) -> None:
        """A shard written (`tokens` it read) or reused (0)."""
        self.pairs += pairs
        self.tokens += tokens
        self.shard_texts = self.shard_tokens = 0
        self._show(self.pairs)

    def _show(self, done: int) -> None:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{(self.tokens + self.shard_tokens) / seconds:,.0f} tokens/s", refresh=False)
        self.bar.update(max(done - self.bar.n, 0))

    def close(self) -> None:
        if self.bar.total is not None and self.bar.n != self.bar.total:  # rows skipped as bad: end at 100%
            self.bar.total = self.bar.n
            self.bar.refresh()
        self.bar.close()


def embed_pairs(pairs: Iterable[PreferencePair], backbone: Backbone, out_dir: str | Path, *,
                shard_size: int = 4096, token_budget: int | None = None, max_batch: int = 64, dataset: str = "",
                progress: bool = True, total: int | None = None) -> EmbedReport:
    """Embed a stream of pairs into `out_dir` shard by shard; reruns skip shards already written.

    `total`: how many pairs to expect, for the progress bar (`rewardprism.sources.size_hint`)."""
    writer = ShardWriter(out_dir, FeatureSpec.of(backbone), backbone.dim, dataset)
    bar = EmbedProgress(total, progress)
    extractor = EmbeddingExtractor(backbone, token_budget, max_batch, on_batch=bar.batch)
    return write_embeddings(chunked(pairs, shard_size), writer, lambda todo: map(extractor.embed_pairs, todo), bar)


def write_embeddings(chunks: Iterable[list[PreferencePair]], writer: ShardWriter, embed_chunks: EmbedChunks,
                     bar: EmbedProgress) -> EmbedReport:
    """The loop the local and the Ray paths share: fingerprint each shard, reuse it or embed it, write.

    `embed_chunks` maps the stream of shards that need work to their features, in order; a lazy map keeps
    one shard in memory (`tee` buffers only the shards between the two cursors: the Ray path reads one window
    of shards ahead). A run that fails leaves no temporary files, and no folder at all if it made the folder
    and wrote no shard; shards it did write stay, for a rerun to reuse.
    """
    start, tokens, written, reused = time.perf_counter(), 0, 0, 0
    spec = writer.features
    plan = ((number, chunk, shard_fingerprint(spec.backbone, spec.max_length, chunk))
            for number, chunk in enumerate(chunks))
    plan = ((number, chunk, fp, writer.has(number, fp)) for number, chunk, fp in plan)
    ahead, behind = itertools.tee(plan)
    results = embed_chunks(chunk for _, chunk, _, reuse in ahead if not reuse)
    pairs_file = writer.out / f".{PAIRS}.tmp"
    try:
        with _PairsAppender(pairs_file) as pairs_out:
            for number, chunk, fingerprint, reuse in behind:
                n_tokens = 0
                if reuse:
                    writer.reuse(fingerprint)
                    reused += 1
                else:
                    chosen, rejected, n_tokens = next(results)
                    writer.write(number, fingerprint, chosen, rejected, n_tokens)
                    tokens += n_tokens
                    written += 1
                pairs_out.add(chunk)
                bar.shard(len(chunk), n_tokens)
        os.replace(pairs_file, writer.out / PAIRS)
    except BaseException:
        for tmp in writer.out.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        if writer.created and not written and not reused:
            shutil.rmtree(writer.out, ignore_errors=True)
        raise
    finally:
        bar.close()
    return EmbedReport(writer.index["n_pairs"], tokens, time.perf_counter() - start, written, reused)


class _PairsAppender:
    def __init__(self, path: Path):
        import gzip

        self.file = gzip.open(path, "wt", encoding="utf-8")

    def add(self, pairs: list[PreferencePair]) -> None:
        for pair in pairs:
            self.file.write(json.dumps(pair.to_row()) + "\n")

    def __enter__(self) -> _PairsAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


class EmbeddingSet:
    """Read side of an embedding folder: shards one at a time (streaming) or everything at once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / INDEX).exists():
            raise FileNotFoundError(f"{self.path} is not an embedding folder (no {INDEX}); run `rewardprism embed`")
        self.index = json.loads((self.path / INDEX).read_text())

    @property
    def backbone(self) -> str:
        return self.index["backbone"]

    @property
    def dim(self) -> int:
        return int(self.index["dim"])

    @property
    def features(self) -> FeatureSpec:
        """How the features were made; a folder written before specs were recorded is refused (`ValueError`)."""
        recorded = self.index.get("features")
        if recorded is None:
            raise FeatureMismatch(f"{self.path} records no feature spec (written before specs existed): run "
                                  "`rewardprism embed` into it again with the options it was made with (its shards "
                                  "are reused)")
        return FeatureSpec.from_dict(recorded)

    def __len__(self) -> int:
        return int(self.index["n_pairs"])

    def shards(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for shard in self.index["shards"]:
            tensors = load_file(self.path / shard["file"])
            yield tensors["chosen"], tensors["rejected"]

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """All chosen and rejected features, (N, d) each — for evaluation-sized sets."""
        parts = list(self.shards())
        if not parts:
            return np.empty((0, self.dim), np.float32), np.empty((0, self.dim), np.float32)
        return np.concatenate([c for c, _ in parts]), np.concatenate([r for _, r in parts])

    def pairs(self) -> list[PreferencePair]:
        """The pairs, in the order of the features; a folder whose embedding run did not finish has none."""
        if not (self.path / PAIRS).exists():
            raise ValueError(f"{self.path} holds no {PAIRS}: the embedding run that wrote it did not finish; "
                             "run `rewardprism embed` again to complete it")
        pairs = load_pairs(self.path / PAIRS, fmt="canonical")
        if len(pairs) != len(self):
            raise ValueError(f"{self.path} holds {len(pairs)} pairs but {len(self)} embeddings: an embedding run "
                             "into it did not finish; run `rewardprism embed` again to complete it")
        return pairs
