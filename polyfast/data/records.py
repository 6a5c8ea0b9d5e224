"""Records (one human response in its context) and the readers that turn files into them.

Formats, detected per row:
- polyfast JSONL: the fields of :class:`Record` (``response`` required);
- LLaMA-Factory alpaca (``instruction``/``input``/``output``/``system``/``history``), including the
  authors' ``dist_sft_*.json`` with ``bucket_id``, ``length_bin``, ``family``, ``track``,
  ``style_bucket`` and ``dist_sft_weight``;
- chat JSONL with a ``messages`` list of ``{"role", "content"}`` (system?, user, assistant, ...,
  ending on the assistant response).

Sources, and how each is decoded: ``.json`` / ``.jsonl`` files as UTF-8 JSON; a ``save_to_disk``
directory, ``.parquet`` and ``.arrow`` files through ``datasets`` (Arrow and Parquet data and JSON
metadata); ``hf:NAME`` through ``datasets.load_dataset`` (which runs no dataset scripts).
None of them runs code from the file.

Rows are numbered from 1 (the line of a JSONL file, the position in a JSON array); a row without
an ``id`` gets a hash of its content, so that a sliced or reordered file keeps its ids. Bad rows raise
:class:`DataError` naming file and row; with ``skip_bad_rows=True`` they are skipped and counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..errors import DataError
from . import text as T

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """One human response in its interaction context (docs/method.md section 1)."""

    id: str
    response: str
    question: str = ""
    context: str = ""
    system: str = ""          # the record's own system prompt; profile prompts are derived, not stored
    history: tuple[tuple[str, str], ...] = ()
    language: str = "en"
    track: str = "single"
    family: str = "assistant"
    style: str = ""
    length_bin: str = "short"
    bucket_id: str = "en|single|assistant|short"
    weight: float | None = None   # a weight shipped with the data (the authors' dist_sft_weight)
    split: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def prompt(self) -> str:
        """The user turn: question, then context (LLaMA-Factory joins instruction and input so)."""
        return "\n".join(p for p in (self.question, self.context) if p)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["history"] = [list(turn) for turn in self.history]
        return {k: v for k, v in d.items() if v not in (None, "", {}, [])}


def make_record(*, id: str, response: str, question: str = "", context: str = "", system: str = "",
                history=(), language: str | None = None, track: str | None = None,
                family: str | None = None, style: str | None = None, length_bin: str | None = None,
                bucket_id: str | None = None, weight: float | None = None, split: str = "",
                meta: dict | None = None, legacy_tokens: bool = False) -> Record:
    """Build a Record, deriving what the data leaves out and checking what it gives.

    Raises ValueError (the readers add file and row) on unknown languages, tracks, families or bins,
    and on a given bucket_id that disagrees with its parts.
    """
    history = tuple((u, a) for u, a in history)
    if language is None:
        language = T.detect_language(" ".join([question, context, response]))
    if track is None:
        track = "multi" if history else "single"
    family = family or "assistant"
    if length_bin is None:
        length_bin = T.length_bin(T.token_count(response, legacy=legacy_tokens))
    for name, value, allowed in (("language", language, T.LANGUAGES), ("track", track, T.TRACKS),
                                 ("family", family, T.FAMILIES),
                                 ("length_bin", length_bin, T.LENGTH_BINS)):
        if value not in allowed:
            raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")
    derived = T.bucket_id(language, track, family, length_bin)
    if bucket_id is not None and bucket_id != derived:
        raise ValueError(f"bucket_id {bucket_id!r} disagrees with its parts ({derived!r})")
    if system and T.is_profile_prompt(system):
        system = ""  # a profile prompt is rebuilt from the metadata when asked for
    return Record(id=str(id), response=response, question=question, context=context, system=system,
                  history=history, language=language, track=track, family=family, style=style or "",
                  length_bin=length_bin, bucket_id=derived, weight=weight, split=split,
                  meta=dict(meta or {}))


@dataclass
class LoadReport:
    """What a read kept and skipped (skips only happen with ``skip_bad_rows``)."""

    path: str
    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)    # reason -> count
    empty_responses: int = 0
    first_errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = f"{self.path}: {self.kept}/{self.rows} rows kept"
        if self.skipped:
            s += " (skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) + ")"
        if self.empty_responses:
            s += f"; {self.empty_responses} empty responses"
        return s


# ---------------------------------------------------------------------------------------------
# row parsers: dict -> keyword arguments of make_record; raise ValueError with a plain message


def row_str(row: dict, key: str, required: bool = False) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise ValueError(f"missing '{key}'")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def row_history(row: dict, key: str = "history") -> list[tuple[str, str]]:
    value = row.get(key) or []
    if not isinstance(value, list):
        raise ValueError(f"'{key}' must be a list of [user, assistant] pairs")
    turns = []
    for i, turn in enumerate(value):
        if isinstance(turn, dict):
            turn = [turn.get("user"), turn.get("assistant")]
        if (not isinstance(turn, (list, tuple)) or len(turn) != 2
                or not all(isinstance(t, str) for t in turn)):
            raise ValueError(f"'{key}[{i}]' must be a [user, assistant] pair of strings")
        turns.append((turn[0], turn[1]))
    return turns


def _response(text: str, key: str) -> str:
    # An empty response is kept: QA data marks unanswerable questions so (the authors' sample has
    # 40 per file, and their weights count them). Readers count them in LoadReport.empty_responses.
    return text


def row_number(row: dict, key: str) -> float | None:
    """A finite number (JSON's NaN and Infinity are refused), or None when absent."""
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"'{key}' must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"'{key}' must be a finite number, got {value}")
    return float(value)


def row_weight(row: dict, key: str) -> float | None:
    """A finite, non-negative weight, or None when absent."""
    value = row_number(row, key)
    if value is not None and value < 0:
        raise ValueError(f"'{key}' must be >= 0, got {value}")
    return value


def meta_fields(row: dict) -> dict[str, Any]:
    out = {}
    for key in ("language", "track", "family", "length_bin", "bucket_id"):
        if row.get(key) is not None:
            out[key] = row_str(row, key)
    style = row.get("style", row.get("style_bucket"))
    if style is not None:
        out["style"] = row_str({"style": style}, "style")
    return out


_POLYFAST_KEYS = {f.name for f in dataclasses.fields(Record)}
_ALPACA_KEYS = {"instruction", "input", "output", "system", "history", "dist_sft_weight",
                "style_bucket", "weight", "id", "split"} | _POLYFAST_KEYS
_CHAT_KEYS = {"messages", "id", "weight", "split", "style_bucket"} | _POLYFAST_KEYS


def _parse_polyfast(row: dict, default_id: str) -> dict:
    return dict(id=row.get("id", default_id), response=_response(row_str(row, "response", True), "response"),
                question=row_str(row, "question"), context=row_str(row, "context"),
                system=row_str(row, "system"), history=row_history(row), weight=row_weight(row, "weight"),
                split=row_str(row, "split"), **meta_fields(row),
                meta={k: v for k, v in row.items() if k not in _POLYFAST_KEYS})


def _parse_alpaca(row: dict, default_id: str) -> dict:
    weight = row_weight(row, "dist_sft_weight")
    if weight is None:
        weight = row_weight(row, "weight")
    return dict(id=row.get("id", default_id), response=_response(row_str(row, "output", True), "output"),
                question=row_str(row, "instruction"), context=row_str(row, "input"),
                system=row_str(row, "system"), history=row_history(row), weight=weight,
                split=row_str(row, "split"), **meta_fields(row),
                meta={k: v for k, v in row.items() if k not in _ALPACA_KEYS})


def _parse_chat(row: dict, default_id: str) -> dict:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    system, turns = "", []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be an object with a string 'content'")
        role = m.get("role")
        if role == "system" and i == 0:
            system = m["content"]
        elif role in ("user", "assistant"):
            want = "user" if len(turns) % 2 == 0 else "assistant"
            if role != want:
                raise ValueError(f"messages[{i}]: expected a '{want}' turn, got '{role}'")
            turns.append(m["content"])
        else:
            raise ValueError(f"messages[{i}]: unknown role {role!r} "
                             "(expected system first, then alternating user/assistant)")
    if len(turns) < 2 or len(turns) % 2:
        raise ValueError("'messages' must end with the assistant response to a user turn")
    history = list(zip(turns[:-2:2], turns[1:-2:2]))
    return dict(id=row.get("id", default_id), response=_response(turns[-1], "messages[-1]"),
                question=turns[-2], system=system, history=history, weight=row_weight(row, "weight"),
                split=row_str(row, "split"), **meta_fields(row),
                meta={k: v for k, v in row.items() if k not in _CHAT_KEYS})


def _parse_row(row: Any, default_id: str) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"a record must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        return _parse_chat(row, default_id)
    if "output" in row or "instruction" in row:
        return _parse_alpaca(row, default_id)
    if "response" in row:
        return _parse_polyfast(row, default_id)
    raise ValueError("no response: expected 'response' (polyfast), 'output' (alpaca) "
                     "or 'messages' (chat)")


# ---------------------------------------------------------------------------------------------
# files


def _decode(path: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"line {line} is not valid UTF-8 ({e.reason} at byte {e.start})", path) from e


def _iter_rows(path: str, skip_bad_rows: bool, report: LoadReport) -> Iterator[tuple[int, Any]]:
    """Yield (row number, parsed JSON value). JSONL rows decode line by line, so a bad line in a
    JSONL file is one bad row; a JSON file must parse as a whole."""
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise DataError("empty file", path)
    is_jsonl = path.endswith(".jsonl") or (not path.endswith(".json")
                                           and raw.lstrip()[:1] == b"{")
    if not is_jsonl:
        try:
            data = json.loads(_decode(path, raw))
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}", path) from e
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError("a .json data file must hold a list of records", path)
        yield from enumerate(data, start=1)
        return
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            kind = "not valid UTF-8" if isinstance(e, UnicodeDecodeError) else f"invalid JSON ({e})"
            if not skip_bad_rows:
                raise DataError(kind, path, lineno) from e
            report.rows += 1
            report.skipped["invalid JSON" if "JSON" in kind else "bad UTF-8"] += 1
            report.first_errors.append(f"{path}:{lineno}: {kind}")


HF_PREFIX = "hf:"


def _is_dataset_dir(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))


# the split names a data role may have in a DatasetDict
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation", "valid", "dev"),
               "test": ("test",)}


def dataset_rows(path: str, split: str = "") -> Iterator[tuple[int, dict]] | None:
    """Rows of a Hugging Face ``datasets`` source, numbered from 1, or None when ``path`` is a
    plain JSON/JSONL file: a ``save_to_disk`` directory (of a Dataset, or of a DatasetDict: the
    split named for the role ``split``, see ``SPLIT_NAMES``, or its only one), a ``.parquet`` or
    ``.arrow`` file, or ``hf:NAME[:SPLIT]`` (a Hub dataset: SPLIT, else the split of the role).
    Columns a row leaves empty (None) are dropped, so each row reads as the JSON object it would
    be in a JSONL file."""
    is_file = path.endswith((".parquet", ".arrow")) and os.path.isfile(path)
    if not (path.startswith(HF_PREFIX) or is_file or _is_dataset_dir(path)):
        return None
    import datasets  # only for these sources: it takes a second to import

    if path.startswith(HF_PREFIX):
        ds = _hub_dataset(path, split)
    elif not is_file:
        try:
            ds = datasets.load_from_disk(path)
        except (OSError, ValueError) as e:
            raise DataError(f"datasets cannot load this directory: {e}", path) from None
    else:
        try:
            ds = (datasets.Dataset.from_parquet(path) if path.endswith(".parquet")
                  else datasets.Dataset.from_file(path))
        except Exception as e:  # pyarrow's errors have no common base beyond Exception
            raise DataError(f"not a readable {os.path.splitext(path)[1]} file: {e}", path) from None
    if isinstance(ds, datasets.DatasetDict):
        ds = _pick_split(ds, split, path)
    return ((i, {k: v for k, v in row.items() if v is not None})
            for i, row in enumerate(ds, start=1))


def _pick_split(dd, role: str, path: str):
    """The split of a DatasetDict for a data role (train/val/test), or its only split."""
    for name in SPLIT_NAMES.get(role, (role,) if role else ()):
        if name in dd:
            return dd[name]
    if len(dd) == 1:
        return next(iter(dd.values()))
    names = ", ".join(dd)
    raise DataError(f"a DatasetDict with splits {names} and none for {role or 'this input'!r}: "
                    "name the split (a split's directory, or hf:NAME:SPLIT)", path)


def _hub_dataset(path: str, role: str):
    """``hf:NAME[:SPLIT]`` from the Hub (or the local datasets cache): a Dataset, or without
    SPLIT the DatasetDict."""
    import datasets

    name, _, want = path[len(HF_PREFIX):].partition(":")
    if not name:
        raise DataError("expected hf:NAME or hf:NAME:SPLIT", path)
    try:
        return datasets.load_dataset(name, split=want or None)
    except Exception as e:  # offline, unknown name or split: the Hub client's errors vary
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        which = f" split {want!r}" if want else ""
        raise DataError(f"cannot load the Hub dataset {name!r}{which} (offline, or no such "
                        f"dataset or split?): {first}", path) from None


def _reason(message: str) -> str:
    """A skip reason to count under: the message with row-specific numbers and values blanked."""
    return re.sub(r"\d+|'[^']*'|\"[^\"]*\"", "#", message)[:80]


def content_id(row: Any, seen: Counter) -> str:
    """The id of a row that has none: a hash of its content (so a subset or a reordering of the
    file keeps every row's id), with ``#k`` for the k-th repeat of the same content."""
    text = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]
    seen[digest] += 1
    return digest if seen[digest] == 1 else f"{digest}#{seen[digest]}"


def read_rows(path: str | os.PathLike, parse, *, skip_bad_rows: bool = False, kind: str = "records",
              unique=None, split: str = ""):
    """Parse every row of a data source (see ``dataset_rows`` for the Hugging Face datasets forms;
    ``split`` picks a DatasetDict's split) with ``parse(row, default_id)`` (which raises
    ValueError on a bad row) into items with an ``id``; duplicates are bad rows too: items with the
    same id, or with the same ``unique`` (name, key function) where several items may share an id.
    Returns (items, LoadReport); DataError names file and row unless ``skip_bad_rows``."""
    path = os.fspath(path)
    rows = dataset_rows(path, split)
    if rows is None:
        if not os.path.exists(path):
            raise DataError("no such file", path)
        if os.path.isdir(path):
            raise DataError("is a directory, but not one datasets' save_to_disk wrote; expected "
                            "a .jsonl/.json/.parquet/.arrow file or such a directory", path)
    report = LoadReport(path)
    items, seen, hashes = [], {}, Counter()
    what, key = unique or ("id", lambda item: item.id)
    for row_no, row in rows if rows is not None else _iter_rows(path, skip_bad_rows, report):
        report.rows += 1
        try:
            has_id = isinstance(row, dict) and row.get("id") is not None
            item = parse(row, "" if has_id else content_id(row, hashes))
            if key(item) in seen:
                raise ValueError(f"duplicate {what} {item.id!r} (first at row {seen[key(item)]})")
        except ValueError as e:
            if not skip_bad_rows:
                raise DataError(str(e), path, row_no) from None
            report.skipped[_reason(str(e))] += 1
            if len(report.first_errors) < 5:
                report.first_errors.append(f"{path}:{row_no}: {e}")
            continue
        seen[key(item)] = row_no
        items.append(item)
    report.kept = len(items)
    if not items:
        raise DataError(f"no usable {kind} ({report.summary()})", path)
    if report.skipped:
        log.warning("%s; first: %s", report.summary(), "; ".join(report.first_errors[:3]))
    return items, report


def read_records(path: str | os.PathLike, *, skip_bad_rows: bool = False, legacy_tokens: bool = False,
                 split: str = "") -> tuple[list[Record], LoadReport]:
    """Read records and a report of what was kept. See :func:`load_records`."""
    def parse(row, default_id):
        rec = make_record(**_parse_row(row, default_id), legacy_tokens=legacy_tokens)
        return dataclasses.replace(rec, split=split) if split and not rec.split else rec

    records, report = read_rows(path, parse, skip_bad_rows=skip_bad_rows, split=split)
    report.empty_responses = sum(not r.response.strip() for r in records)
    if report.empty_responses:
        log.info("%s: %d records have an empty response", report.path, report.empty_responses)
    return records, report


def load_records(path: str | os.PathLike, *, skip_bad_rows: bool = False,
                 legacy_tokens: bool = False, split: str = "") -> list[Record]:
    """Read a .jsonl/.json file of polyfast, alpaca or chat records.

    Metadata the file gives (language, track, family, length_bin, bucket_id) is kept and checked for
    consistency; what it leaves out is derived (``legacy_tokens`` picks the authors' token regex for
    the length bin). Bad rows raise DataError naming the file and row, unless ``skip_bad_rows``,
    which skips them and logs the counts.
    """
    return read_records(path, skip_bad_rows=skip_bad_rows, legacy_tokens=legacy_tokens,
                        split=split)[0]
