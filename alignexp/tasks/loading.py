"""Reading raw records, from the hub or from local files, and the loading loop every real task shares.

Where records come from:

* ``task.path`` set: local files. A file (``.jsonl``, ``.json``, ``.parquet``) is read whatever the
  split; a folder is either a ``save_to_disk`` copy (a ``DatasetDict``, from which the split is
  taken, or a single ``Dataset``) or holds data files, of which those named for the split are read
  (``train.jsonl``, ``train-00000-of-00001.parquet``, ``train/part-0.jsonl``; a sub-folder named for
  the hub config, e.g. ``cs-en/``, is preferred as in hub snapshots). Glob patterns work too.
* otherwise: ``datasets.load_dataset(hub_id, ...)``. Without network and without a cached copy
  this raises :class:`DataUnavailable`, whose message says how to make and point at a local copy.

JSON Lines, JSON and Parquet are read here directly (not through ``datasets``), so that a record of
the wrong type reaches validation and is reported with its file, index and field, instead of
failing the whole file in Arrow's schema inference.

:class:`RecordTask` is the base of the real tasks: it runs one :class:`Validator` per source, merges
their reports into ``last_report``, counts over-long texts and logs the summary.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignexp.errors import AlignexpError
from alignexp.hub import ensure_offline_if_unreachable
from alignexp.tasks.base import (
    DataError,
    LoadReport,
    RankedExample,
    Task,
    Text,
    Validator,
    check_ranking_length,
    truncate_rankings,
)

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataUnavailable(AlignexpError, RuntimeError):
    """The data cannot be read at all (no network and no local copy, a missing file, an unknown split)."""


class NoExamples(DataUnavailable):
    """Data that was read, but of which nothing is left after the filters; the message names each filter
    (the setting that left records out) with its count."""


@dataclass
class InvalidRecord:
    """Stands in for a record that could not even be decoded (a bad JSON line); parsing reports it."""

    reason: str


@dataclass
class RecordSource:
    """Records of one file (or one hub split); ``name`` is what errors cite."""

    name: str
    records: Iterable[Any]
    setting: str | None = None
    """Where the records were chosen: ``task.path=...``, or the hub dataset (``key`` unset)."""
    key: str | None = None
    """The setting that points at local data instead (``task.path``, ``task.eval_path``, ...)."""


# -- local files --------------------------------------------------------------------------------

def _read_jsonl(path: Path) -> Iterator[Any]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                yield InvalidRecord(f"invalid JSON: {error.msg} (column {error.colno})")


def _read_json(path: Path, split: str | None) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(str(path), None, "<file>", f"invalid JSON: {error.msg} (line {error.lineno})") from None
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        if split is not None and isinstance(data.get(split), list):
            return data[split]
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) == 1:
            return data[lists[0]]
        raise DataError(str(path), None, "<file>", "expected a list of records, or an object holding one list "
                        f"(or one list per split); found keys {sorted(data)}")
    raise DataError(str(path), None, "<file>", f"expected a list of records, got {type(data).__name__}")


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def read_file(path: Path, split: str | None = None) -> Iterable[Any]:
    """The records of one JSON Lines, JSON or Parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path, split)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataUnavailable(f"{path}: unsupported file type '{suffix}' (use .jsonl, .json or .parquet, "
                          "or a folder written by Dataset.save_to_disk)")


def _matches_split(relative: Path, split: str) -> bool:
    stem = relative.name[: -len(relative.suffix)] if relative.suffix else relative.name
    if stem == split or re.match(rf"^{re.escape(split)}-\d", stem):
        return True
    return split in relative.parts[:-1]


def _folder_files(folder: Path, split: str | None, config: str | None) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if config is not None:
        in_config = [p for p in files if config in p.relative_to(folder).parts[:-1]]
        files = in_config or files
    if split is None:
        return files
    chosen = [p for p in files if _matches_split(p.relative_to(folder), split)]
    if not chosen and len(files) == 1:
        return files  # one data file: it is the data, whatever the split is called
    if not chosen:
        found = ", ".join(str(p.relative_to(folder)) for p in files[:10]) or "no .jsonl/.json/.parquet files"
        raise DataUnavailable(f"{folder}: no data files for split '{split}' (found: {found}). Name files "
                              f"after their split ({split}.jsonl, {split}-00000-of-00001.parquet) or point "
                              "task.path at one file.")
    return chosen


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _load_saved(folder: Path, split: str | None) -> RecordSource:
    import datasets

    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataUnavailable(f"{folder}: no split '{split}' in this save_to_disk copy "
                                  f"(splits: {', '.join(loaded)}); set the task's split to one of them")
        return RecordSource(f"{folder}[{split}]", loaded[split])
    return RecordSource(str(folder), loaded)


def local_sources(path: str | os.PathLike, split: str | None = None, config: str | None = None) -> list[RecordSource]:
    """The record sources of a local copy: a file, a folder, a ``save_to_disk`` folder or a glob."""
    text = str(path)
    if any(ch in text for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise DataUnavailable(f"task.path={text}: no file matches this pattern")
        return [RecordSource(str(f), read_file(f, split)) for f in files]
    target = Path(text).expanduser()
    if target.is_file():
        return [RecordSource(str(target), read_file(target, split))]
    if target.is_dir():
        if _is_saved_dataset(target):
            return [_load_saved(target, split)]
        return [RecordSource(str(f), read_file(f, split)) for f in _folder_files(target, split, config)]
    raise DataUnavailable(f"task.path={text}: no such file or folder")


# -- the hub --------------------------------------------------------------------------------------

def hub_source(hub_id: str, split: str, config: str | None = None, hub_kwargs: dict[str, Any] | None = None,
               path_key: str = "task.path") -> RecordSource:
    """``datasets.load_dataset(hub_id, config, split=split, **hub_kwargs)``, with a clear error offline."""
    ensure_offline_if_unreachable()
    import datasets

    kwargs = dict(hub_kwargs or {})
    call = ", ".join([repr(hub_id)] + ([repr(config)] if config else [])
                     + [f"split={split!r}"] + [f"{k}={v!r}" for k, v in kwargs.items()])
    try:
        dataset = datasets.load_dataset(hub_id, config, split=split, **kwargs)
    except Exception as error:  # noqa: BLE001 - any failure here means "cannot get the data"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        offline = datasets.config.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        raise DataUnavailable(
            f"cannot load the hub dataset {hub_id}{f' ({config})' if config else ''}, split '{split}': "
            f"{reason}.\n"
            + ("The hub is not reachable (offline mode) and there is no cached copy. " if offline else "")
            + f"Point {path_key} at a local copy instead: a JSONL/JSON/Parquet file or folder, or a folder "
            f"made on a machine with network by\n  python -c \"import datasets; datasets.load_dataset({call})"
            f".save_to_disk('DIR')\"\nthen run with {path_key}=DIR."
        ) from None
    name = f"{hub_id}{f'/{config}' if config else ''}[{split}]"
    return RecordSource(name, dataset)


def record_sources(path: str | None, split: str | None, *, hub_id: str | None, config: str | None = None,
                   hub_kwargs: dict[str, Any] | None = None, path_key: str = "task.path") -> list[RecordSource]:
    """Local files when ``path`` is set, the hub dataset otherwise."""
    if path:
        sources = local_sources(path, split, config)
        setting = f"{path_key}={path}"
    else:
        if not hub_id:
            raise DataUnavailable(f"no data: set {path_key} to your files")
        if split is None:
            raise DataUnavailable(f"no split given for the hub dataset {hub_id}")
        sources = [hub_source(hub_id, split, config, hub_kwargs, path_key)]
        setting = f"the hub dataset {hub_id}, split '{split}' ({path_key} unset)"
    for source in sources:
        source.setting, source.key = setting, path_key
    return sources


# -- the loading loop -----------------------------------------------------------------------------

Parse = Callable[[Any, int, str], "RankedExample | list[RankedExample]"]
"""``parse(record, index, source) -> RankedExample | list[RankedExample]``; raises DataError."""


def text_length(text: Text) -> int:
    """Characters of a prompt or response (the contents of a message list)."""
    if isinstance(text, str):
        return len(text)
    return sum(len(str(m.get("content", ""))) for m in text)


def merge_reports(source: str, reports: Sequence[LoadReport]) -> LoadReport:
    merged = LoadReport(source)
    for report in reports:
        merged.records += report.records
        merged.examples += report.examples
        merged.skipped.update(report.skipped)
        merged.truncated.update(report.truncated)
        merged.filtered.update(report.filtered)
    return merged


def no_examples_message(what: str, sources: Sequence[RecordSource], report: LoadReport) -> str:
    """``mt preferences (task.path=...): 2 records read; 2 left out: language_pair de-en not in ...``."""
    first = sources[0] if sources else RecordSource(report.source, [])
    setting, key = first.setting or first.name, first.key or "the task's data setting"
    if report.records == 0:
        files = ", ".join(s.name for s in sources[:3])
        return f"{what} ({setting}): no records in {files} (an empty file?); point {key} at data with records"
    why = report.left_out() or "no reason recorded"
    return (f"{what} ({setting}): {report.records} records read; {why}. No examples are left: change the "
            f"setting named above, or point {key} at other data")


def _limited(records: Iterable[Any], limit: int | None) -> Iterable[Any]:
    if limit is None:
        return records
    return (record for i, record in zip(range(limit), records))


class RecordTask(Task):
    """Shared by the real tasks: settings every task has, and :meth:`load` (parse + validate + report).

    Args:
        name: the task's name (the config file's name).
        path: local copy of the task's main data (see the module docstring); None reads the hub.
        split: the split of the main data.
        ranking_length: keep this many responses of each ranking (``truncate_rankings``); None keeps all.
        skip_invalid: count and skip invalid records instead of stopping at the first one.
        max_prompt_chars, max_response_chars: count (not cut) texts longer than this; None counts nothing.
        max_records: read at most this many records per source (quick looks at big datasets).
        max_eval_examples: keep at most this many evaluation examples (the first ones).
    """

    def __init__(self, name: str, path: str | None = None, split: str = "train", ranking_length: int | None = None,
                 skip_invalid: bool = False, max_prompt_chars: int | None = None,
                 max_response_chars: int | None = None, max_records: int | None = None,
                 max_eval_examples: int | None = None):
        check_ranking_length(ranking_length)
        for key, value in (("max_prompt_chars", max_prompt_chars), ("max_response_chars", max_response_chars),
                           ("max_records", max_records), ("max_eval_examples", max_eval_examples)):
            if value is not None and value < 1:
                raise ValueError(f"task.{key} must be >= 1 or null, got {value}")
        self.name, self.path, self.split = name, path, split
        self.ranking_length, self.skip_invalid = ranking_length, skip_invalid
        self.max_prompt_chars, self.max_response_chars = max_prompt_chars, max_response_chars
        self.max_records, self.max_eval_examples = max_records, max_eval_examples
        self.last_report: LoadReport | None = None

    def load(self, sources: Sequence[RecordSource], parse: Parse, min_responses: int = 1,
             what: str = "") -> list[RankedExample]:
        """Parse and validate every record of ``sources``; sets ``last_report`` and logs its summary."""
        reports, examples = [], []
        for source in sources:
            validator = Validator(source.name, self.skip_invalid, min_responses)

            def parse_one(record: Any, index: int, name: str = source.name):
                if isinstance(record, InvalidRecord):
                    raise DataError(name, index, "<record>", record.reason)
                try:
                    return parse(record, index, name)
                except DataError as error:
                    if index == 0 and error.reason == "missing field" and isinstance(record, dict):
                        keys = sorted(record)
                        shown = ", ".join(map(repr, keys[:8])) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
                        raise DataError(name, index, error.field_name, f"missing field; the record has {shown}: "
                                        f"data of another task's schema? (task={self.name} reads it)") from None
                    raise

            examples.extend(validator.run(_limited(source.records, self.max_records), parse_one))
            reports.append(validator.report)
        label = sources[0].name if len(sources) == 1 else f"{len(sources)} files ({sources[0].name}, ...)"
        report = merge_reports(f"{self.name}{f' {what}' if what else ''}: {label}", reports)
        self._count_lengths(examples, report)
        self.last_report = report
        log.info(report.summary())
        if not examples:
            raise NoExamples(no_examples_message(f"{self.name}{f' {what}' if what else ''}", sources, report))
        return examples

    def _count_lengths(self, examples: Sequence[RankedExample], report: LoadReport) -> None:
        for example in examples:
            if self.max_prompt_chars is not None and text_length(example.prompt) > self.max_prompt_chars:
                report.truncated[f"prompt > {self.max_prompt_chars} chars"] += 1
            if self.max_response_chars is not None and any(
                    text_length(r) > self.max_response_chars for r in example.responses):
                report.truncated[f"response > {self.max_response_chars} chars"] += 1

    @staticmethod
    def resolve_split(split: str | None, configured: str | None) -> str | None:
        """The split to read: None or ``"train"`` (the Task protocol's default, what ``train.py`` passes)
        mean the configured training split of that stage (``task.split``, ``task.sft_split``), so that
        overriding it in the config takes effect; any other name is read as given."""
        return configured if split in (None, "train") and configured else split

    def rankings(self, examples: list[RankedExample]) -> list[RankedExample]:
        """Preference examples as returned: cut to ``ranking_length`` responses where set."""
        return truncate_rankings(examples, self.ranking_length)

    def eval_subset(self, examples: list[RankedExample]) -> list[RankedExample]:
        return examples if self.max_eval_examples is None else examples[: self.max_eval_examples]
