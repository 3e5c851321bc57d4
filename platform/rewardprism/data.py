"""Preference data: one canonical pair schema and the loaders that produce it.

Every source — TRL-format files or hub datasets, HH-RLHF transcripts, AlpacaEval judgements, the synthetic
generator in `rewardprism.synthetic` — becomes a list of `PreferencePair`, so everything downstream (embedding,
decomposition, training, serving) reads one shape.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import itertools
import json
import logging
import math
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

Message = dict[str, str]
Prompt = str | list[Message]


class DataError(ValueError):
    """A bad file or field, with where it was found so the user can fix it."""

    def __init__(self, message: str, *, source: str | None = None, row: int | None = None,
                 field: str | None = None):
        where = ", ".join(p for p in (source and f"file {source}", row is not None and f"row {row}",
                                      field and f"field '{field}'") if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.source, self.row, self.field = source, row, field


@dataclass(frozen=True)
class PreferencePair:
    """One labelled comparison: `chosen` was preferred to `rejected` as answers to `prompt`.

    `prompt` is plain text or chat messages (`[{"role": ..., "content": ...}]`, the last turn the user's);
    `attributes` holds per-response ratings `{"chosen": {name: value}, "rejected": {...}}` when the source has
    them; `weight` is the label's confidence (AlpacaEval's weighted judges), 1.0 otherwise.
    """

    prompt: Prompt
    chosen: str
    rejected: str
    group: str | None = None
    annotator: str | None = None
    attributes: dict[str, dict[str, float]] | None = None
    weight: float = 1.0

    @property
    def prompt_key(self) -> str:
        """A stable identity of the prompt, used to split by prompt and to group pairs."""
        text = self.prompt if isinstance(self.prompt, str) else json.dumps(self.prompt, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any], *, source: str = "<rows>", index: int = 0) -> PreferencePair:
        """Validate one canonical row (as written by `to_row` / `save_pairs`)."""
        allowed = {f for f in cls.__dataclass_fields__}
        unknown = set(row) - allowed
        if unknown:
            raise DataError(f"unknown fields {sorted(unknown)}", source=source, row=index)
        for name in ("prompt", "chosen", "rejected"):
            if name not in row:
                raise DataError("missing", source=source, row=index, field=name)
        prompt = _check_prompt(row["prompt"], source, index, "prompt")
        chosen = _check_text(row["chosen"], source, index, "chosen")
        rejected = _check_text(row["rejected"], source, index, "rejected")
        weight = row.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise DataError(f"must be a positive finite number, got {weight!r}", source=source, row=index,
                            field="weight")
        group, annotator = (_check_optional_text(row.get(name), source, index, name)
                            for name in ("group", "annotator"))
        attributes = _check_attributes(row.get("attributes"), source, index)
        return cls(prompt, chosen, rejected, group, annotator, attributes, float(weight))


def _check_optional_text(value: Any, source: str, row: int, name: str) -> str | None:
    return None if value is None else _check_text(value, source, row, name)


def _check_attributes(value: Any, source: str, row: int) -> dict[str, dict[str, float]] | None:
    """Ratings of each side: {"chosen": {name: number}, "rejected": {name: number}} with the same names."""
    if value is None:
        return None
    sides = ("chosen", "rejected")
    if (not isinstance(value, dict) or set(value) != set(sides)
            or not all(isinstance(value[s], dict) and all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for k, v in value[s].items()) for s in sides)
            or set(value["chosen"]) != set(value["rejected"])):
        raise DataError('must be {"chosen": {name: number}, "rejected": {name: number}} with the same names',
                        source=source, row=row, field="attributes")
    return {s: {k: float(v) for k, v in value[s].items()} for s in sides}


def _check_text(value: Any, source: str, row: int, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"must be a string, got {type(value).__name__}", source=source, row=row, field=name)
    return value


def _check_prompt(value: Any, source: str, row: int, name: str) -> Prompt:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                       and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError("must be text or a list of {role, content} messages", source=source, row=row, field=name)


# ----------------------------------------------------------------------------------------------- rendering

def render(prompt: Prompt, response: str, tokenizer: Any | None = None) -> str:
    """The text a backbone reads for (prompt, response).

    With a chat template, the conversation goes through it (as the model saw in training); otherwise plain
    text: `prompt + "\\n\\n" + response` for text prompts (the DRM reference's format), and
    `Human: .../Assistant: ...` turns for chat prompts.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                             tokenize=False)
    if isinstance(prompt, str):
        return f"{prompt}\n\n{response}"
    turns = [f"{_SPEAKER.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages]
    return "\n\n".join(turns + [f"Assistant: {response}"])


def render_prompt(prompt: Prompt, tokenizer: Any | None = None) -> str:
    """The prompt alone, as `render` would start it (VRM's weight head reads h(x))."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{_SPEAKER.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages)


_SPEAKER = {"user": "Human", "assistant": "Assistant", "system": "System"}


# ----------------------------------------------------------------------------------------------- file I/O

def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def read_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a json / jsonl / parquet file (optionally .gz), numbered from 0, with errors that name the row."""
    path = Path(path)
    if not path.exists():
        raise DataError("no such file", source=str(path))
    suffixes = [s for s in path.suffixes if s != ".gz"]
    kind = suffixes[-1] if suffixes else ""
    if kind == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield i, row
    elif kind == ".jsonl":
        with _open_text(path) as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"invalid JSON: {exc.msg}", source=str(path), row=i) from None
                if not isinstance(row, dict):
                    raise DataError("each line must be a JSON object", source=str(path), row=i)
                yield i, row
    elif kind == ".json":
        with _open_text(path) as f:
            try:
                rows = json.load(f)
            except json.JSONDecodeError as exc:
                raise DataError(f"invalid JSON at line {exc.lineno}: {exc.msg}", source=str(path)) from None
        if not isinstance(rows, list):
            raise DataError("expected a JSON list of records", source=str(path))
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError("each record must be a JSON object", source=str(path), row=i)
            yield i, row
    else:
        raise DataError("unsupported format (use .json, .jsonl or .parquet, optionally .gz)", source=str(path))


def save_pairs(pairs: Iterable[PreferencePair], path: str | Path) -> Path:
    """Write pairs as canonical jsonl(.gz); `load_pairs` reads them back unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open(path, "wt", encoding="utf-8") if path.suffix == ".gz" else path.open("w", encoding="utf-8")
    with opener as f:
        for pair in pairs:
            f.write(json.dumps(pair.to_row()) + "\n")
    return path


# ----------------------------------------------------------------------------------------------- TRL format

def from_trl_row(row: dict[str, Any], *, source: str, index: int) -> PreferencePair:
    """One row in TRL's preference formats: explicit prompt or implicit (shared prefix), text or chat."""
    for name in ("chosen", "rejected"):
        if name not in row:
            raise DataError("missing", source=source, row=index, field=name)
    chosen, rejected = row["chosen"], row["rejected"]
    extra = {k: row[k] for k in ("group", "annotator", "attributes") if row.get(k) is not None}
    if "weight" in row:
        extra["weight"] = row["weight"]
    if "prompt" in row:
        prompt = _check_prompt(row["prompt"], source, index, "prompt")
        if isinstance(chosen, list):  # conversational: the responses are assistant turns
            chosen = _last_assistant(chosen, source, index, "chosen")
            rejected = _last_assistant(rejected, source, index, "rejected")
        return PreferencePair.from_row({"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra},
                                       source=source, index=index)
    if isinstance(chosen, list):  # implicit prompt, conversational: everything before the last turn
        if not isinstance(rejected, list) or chosen[:-1] != rejected[:-1]:
            raise DataError("chosen and rejected conversations must share all but the last turn",
                            source=source, row=index, field="rejected")
        prompt = _check_prompt(chosen[:-1], source, index, "chosen")
        return PreferencePair.from_row({"prompt": prompt, "chosen": _last_assistant(chosen, source, index, "chosen"),
                                        "rejected": _last_assistant(rejected, source, index, "rejected"), **extra},
                                       source=source, index=index)
    _check_text(chosen, source, index, "chosen")
    _check_text(rejected, source, index, "rejected")
    if "\n\nHuman:" in chosen and "\n\nAssistant:" in chosen:  # HH-RLHF transcripts
        return from_hh_rlhf_row(row, source=source, index=index)
    raise DataError("no prompt: give a 'prompt' field or conversations that share a prefix",
                    source=source, row=index, field="prompt")


def _last_assistant(messages: Any, source: str, index: int, name: str) -> str:
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) \
            or messages[-1].get("role") != "assistant" or not isinstance(messages[-1].get("content"), str):
        raise DataError("must end with an assistant message", source=source, row=index, field=name)
    return messages[-1]["content"]


# ----------------------------------------------------------------------------------------------- HH-RLHF

def parse_transcript(text: str) -> list[Message]:
    """`\\n\\nHuman: ...\\n\\nAssistant: ...` into chat messages."""
    messages: list[Message] = []
    for chunk in text.split("\n\nHuman:")[1:]:
        human, *assistant = chunk.split("\n\nAssistant:")
        messages.append({"role": "user", "content": human.strip()})
        for turn in assistant:
            messages.append({"role": "assistant", "content": turn.strip()})
    return messages


def from_hh_rlhf_row(row: dict[str, Any], *, source: str, index: int) -> PreferencePair:
    """Split the shared conversation from the final Assistant turn, where the two transcripts differ."""
    chosen = parse_transcript(_check_text(row.get("chosen"), source, index, "chosen"))
    rejected = parse_transcript(_check_text(row.get("rejected"), source, index, "rejected"))
    if not chosen or chosen[-1]["role"] != "assistant":
        raise DataError("transcript must end with an Assistant turn", source=source, row=index, field="chosen")
    if not rejected or rejected[-1]["role"] != "assistant":
        raise DataError("transcript must end with an Assistant turn", source=source, row=index, field="rejected")
    if chosen[:-1] != rejected[:-1]:
        raise DataError("chosen and rejected differ before the final Assistant turn", source=source, row=index,
                        field="rejected")
    return PreferencePair(prompt=chosen[:-1], chosen=chosen[-1]["content"], rejected=rejected[-1]["content"],
                          group=row.get("group"))


# ----------------------------------------------------------------------------------------------- AlpacaEval

def from_alpaca_eval_row(row: dict[str, Any], *, source: str, index: int) -> PreferencePair | None:
    """One judgement; `None` for ties/invalid (preference 0 or exactly 1.5)."""
    for name in ("instruction", "output_1", "output_2", "preference"):
        if name not in row:
            raise DataError("missing", source=source, row=index, field=name)
    pref = row["preference"]
    if pref is None:
        return None
    if not isinstance(pref, (int, float)) or not math.isfinite(pref) or not (pref == 0 or 1 <= pref <= 2):
        raise DataError(f"must be 0, 1, 2 or a float in [1, 2], got {pref!r}", source=source, row=index,
                        field="preference")
    if pref == 0 or pref == 1.5:
        return None
    first_wins = pref < 1.5
    p_first = 2.0 - float(pref)  # 1.0 -> output_1 surely better, 2.0 -> output_2 surely better
    a, b = _check_text(row["output_1"], source, index, "output_1"), _check_text(row["output_2"], source, index,
                                                                                 "output_2")
    return PreferencePair(
        prompt=_check_text(row["instruction"], source, index, "instruction"),
        chosen=a if first_wins else b, rejected=b if first_wins else a,
        group=row.get("dataset"), annotator=row.get("annotator"),
        weight=max(p_first, 1.0 - p_first) if isinstance(pref, float) and not float(pref).is_integer() else 1.0,
    )


# ----------------------------------------------------------------------------------------------- entry point

def load_pairs(spec: str | Path, *, split: str = "train", fmt: str = "auto", limit: int | None = None,
               group: str | None = None, skip_bad_rows: bool = False) -> list[PreferencePair]:
    """Load preference pairs from a local file, a folder of files, or a Hugging Face dataset name.

    `fmt` is one of auto, canonical, trl, hh-rlhf, alpaca-eval; auto picks by each row's fields.
    `group` sets the group of pairs that carry none (e.g. "harmless"). A bad row raises `DataError` naming
    file, row and field; with `skip_bad_rows` it is logged and left out instead (real corpora have a few:
    HH-RLHF harmless-base test has 5 transcripts whose two sides differ before the final turn).
    """
    return list(iter_pairs(spec, split=split, fmt=fmt, limit=limit, group=group, skip_bad_rows=skip_bad_rows))


def iter_pairs(spec: str | Path, *, split: str = "train", fmt: str = "auto", limit: int | None = None,
               group: str | None = None, skip_bad_rows: bool = False) -> Iterator[PreferencePair]:
    """`load_pairs` as a stream, so embedding a large dataset never holds it all in memory."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and is_data_file(p))
        if not files:
            raise DataError("folder holds no .json/.jsonl/.parquet files", source=str(path))
        stream = (p for f in files for p in iter_pairs(f, fmt=fmt, group=group, skip_bad_rows=skip_bad_rows))
        yield from (stream if limit is None else itertools.islice(stream, limit))
        return
    if path.exists():
        rows: Iterable[tuple[int, dict[str, Any]]] = read_records(path)
        source = str(path)
    elif str(spec).startswith(("/", ".")) or is_data_file(path):
        raise DataError("no such file", source=str(spec))
    else:
        rows, source = _hub_rows(str(spec), split), f"hub:{spec}[{split}]"
    if fmt != "auto" and fmt not in _PARSERS:
        raise DataError(f"unknown format {fmt!r}; use one of auto, {', '.join(_PARSERS)}")
    count = 0
    for index, row in rows:
        if limit is not None and count >= limit:
            return
        try:
            kind = fmt if fmt != "auto" else _detect(row, source, index)
            pair = _PARSERS[kind](row, source=source, index=index)
        except DataError as exc:
            if not skip_bad_rows:
                raise
            log.warning("skipped bad row: %s", exc)
            continue
        if pair is None:
            continue
        if group is not None and pair.group is None:
            pair = dataclasses.replace(pair, group=group)
        count += 1
        yield pair


def is_data_file(path: Path) -> bool:
    names = [s for s in path.suffixes if s != ".gz"]
    return bool(names) and names[-1] in {".json", ".jsonl", ".parquet"}


def _hub_rows(name: str, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a Hugging Face dataset (needs network or a local HF cache)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as exc:  # the hub raises many types; the user needs the name and the reason
        raise DataError(f"cannot load Hugging Face dataset: {exc}", source=f"hub:{name}") from exc
    yield from enumerate(ds)


def _detect(row: dict[str, Any], source: str, index: int) -> str:
    if "output_1" in row and "preference" in row:
        return "alpaca-eval"
    if "chosen" in row or "rejected" in row:  # a preference row; the parser names what is missing
        return "canonical" if set(row) <= set(PreferencePair.__dataclass_fields__) and isinstance(
            row.get("chosen"), str) and "prompt" in row else "trl"
    raise DataError(f"unrecognized record with fields {sorted(row)[:8]}; expected prompt/chosen/rejected "
                    "(TRL), HH-RLHF transcripts, or AlpacaEval output_1/output_2/preference", source=source, row=index)


_PARSERS = {
    "canonical": lambda row, source, index: PreferencePair.from_row(row, source=source, index=index),
    "trl": from_trl_row,
    "hh-rlhf": from_hh_rlhf_row,
    "alpaca-eval": from_alpaca_eval_row,
}


# ----------------------------------------------------------------------------------------------- splits

SPLIT_RULE = "blake2b-normalized-prompt-v1"


def normalized_prompt(prompt: Prompt) -> str:
    """The text a split hashes: NFC, whitespace runs collapsed, ends stripped; chat messages as canonical JSON.

    Two files that write the same instruction with different spacing or key order fall on the same side.
    """
    def clean(text: str) -> str:
        return " ".join(unicodedata.normalize("NFC", text).split())

    if isinstance(prompt, str):
        return clean(prompt)
    return json.dumps([{k: clean(v) for k, v in m.items()} for m in prompt], sort_keys=True, ensure_ascii=False,
                      separators=(",", ":"))


def split_record(test_fraction: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """How `split_by_prompt` splits, as a head set records it (`info["split"]`): rule, seed and test fraction."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    return {"rule": SPLIT_RULE, "seed": int(seed), "test_fraction": float(test_fraction)}


def prompt_bucket(prompt: Prompt, seed: int | str) -> float:
    """A uniform number in [0, 1) that depends only on the normalized prompt and the seed.

    Splits made inside a training half (cross-fitting, cross-validation) take string seeds of their own: with
    the half's seed they would all fall on one side of it.
    """
    digest = hashlib.blake2b(normalized_prompt(prompt).encode(), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def split_by_prompt(pairs: Sequence[PreferencePair], test_fraction: float = 0.5,
                    seed: int | str = 0) -> tuple[list[int], list[int]]:
    """Train/test indices with no prompt on both sides, each prompt's side a function of the prompt alone.

    A prompt is in test when its seeded hash (`prompt_bucket`) is below `test_fraction`, so two datasets that
    share prompts share the split whatever rows either drops or however they are ordered (the earlier split
    permuted prompts in order of first appearance, and a dropped row moved others across). The test share is
    `test_fraction` up to binomial noise.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    buckets: dict[str, float] = {}
    for p in pairs:
        if p.prompt_key not in buckets:
            buckets[p.prompt_key] = prompt_bucket(p.prompt, seed)
    train = [i for i, p in enumerate(pairs) if buckets[p.prompt_key] >= test_fraction]
    test = [i for i, p in enumerate(pairs) if buckets[p.prompt_key] < test_fraction]
    return train, test


def groups_of(pairs: Sequence[PreferencePair]) -> np.ndarray:
    """Group label per pair ('all' where a pair has none), as an array for masking."""
    return np.array([p.group if p.group is not None else "all" for p in pairs], dtype=object)


@dataclass
class DatasetSummary:
    """What `rewardprism embed` and the demo print about a dataset."""

    n_pairs: int
    n_prompts: int
    groups: dict[str, int] = field(default_factory=dict)
    annotators: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, pairs: Sequence[PreferencePair]) -> DatasetSummary:
        from collections import Counter

        return cls(len(pairs), len({p.prompt_key for p in pairs}),
                   dict(Counter(p.group or "all" for p in pairs)),
                   dict(Counter(p.annotator for p in pairs if p.annotator)))
