"""The paper profile's benchmark loaders: GSM8K, TruthfulQA MC and MMLU, from the Hub or a local copy.

Rows are plain dicts in the Hub's feature layout (openai/gsm8k main, truthfulqa/truthful_qa multiple_choice,
cais/mmlu all). A local copy (`prepare.hub.local_dir`) is a directory of JSON Lines files in that layout,
like ../shared/data (`gsm8k/test.jsonl`, `truthfulqa/multiple_choice.jsonl`, `mmlu/dev.jsonl`, ...).

Without network the Hub path fails within seconds: a single Hub API request with a short timeout and no
retries (`HfApi.dataset_info`) runs before `datasets.load_dataset`, whose own download retries back off for
tens of seconds to minutes. With HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, the probe is skipped and
`load_dataset` reads the local Hugging Face cache only (it fails at once when the dataset is not cached).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import datasets
import httpx2  # huggingface_hub 2.x's HTTP client: its transport errors are the "no network" signal
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import (
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from poststate.artifacts import file_sha256, read_jsonl
from poststate.params import HubDataset

HUB_PROBE_TIMEOUT_S = 5.0  # the connectivity probe's connect/read timeout
LOCAL_DIR_PARAM = "prepare.hub.local_dir"


class HubUnreachableError(ConnectionError):
    """The Hugging Face Hub could not be reached (or offline mode is on and the dataset is not cached)."""


def _unreachable(ds: HubDataset, reason: str) -> HubUnreachableError:
    return HubUnreachableError(
        f"cannot load {ds.path} (config {ds.name!r}, split {ds.split!r}, revision {ds.revision!r}) from the "
        f"Hugging Face Hub at {constants.ENDPOINT}: {reason}. Without network, set {LOCAL_DIR_PARAM} in "
        f"params.yaml to a directory of JSON Lines copies in the Hub schema (the layout of ../shared/data)."
    )


def _probe_hub(ds: HubDataset, timeout_s: float) -> str | None:
    """One request to the Hub API for `ds` at its revision, with a timeout and no retries: the commit sha
    the revision resolves to.

    Raises HubUnreachableError on a network failure or a Hub server error, ValueError when the Hub
    answers that the dataset or revision does not exist (or is private/gated without a token)."""
    try:
        return HfApi(endpoint=constants.ENDPOINT).dataset_info(ds.path, revision=ds.revision, timeout=timeout_s).sha
    except (httpx2.TransportError, OfflineModeIsEnabled) as e:
        raise _unreachable(ds, f"{type(e).__name__}: {e}") from e
    except RevisionNotFoundError as e:
        raise ValueError(f"Hub dataset {ds.path} has no revision {ds.revision!r}") from e
    except RepositoryNotFoundError as e:
        raise ValueError(f"Hub dataset {ds.path} not found (or private/gated without a token)") from e
    except HfHubHTTPError as e:
        raise _unreachable(ds, f"the Hub answered {e}") from e


def load_rows(ds: HubDataset, local_dir: Path | None, local_file: str) -> list[dict[str, Any]]:
    """The rows of `ds`: from `local_dir / local_file` (JSON Lines, Hub schema) when `local_dir` is given,
    else `datasets.load_dataset(ds.path, ds.name, split=ds.split, revision=<the revision's commit sha>)`."""
    return load_rows_with_source(ds, local_dir, local_file)[0]


def load_rows_with_source(ds: HubDataset, local_dir: Path | None, local_file: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows, where they came from): the local file and its sha256, or the Hub dataset, its revision and the
    commit sha it resolved to (None with HF_HUB_OFFLINE, when only the local cache is read)."""
    if local_dir is not None:
        path = Path(local_dir) / local_file
        if not path.is_file():
            raise FileNotFoundError(f"local dataset file {path} does not exist (from {LOCAL_DIR_PARAM})")
        return read_jsonl(path), {"file": path.as_posix(), "sha256": file_sha256(path)}
    sha = None if datasets.config.HF_HUB_OFFLINE else _probe_hub(ds, HUB_PROBE_TIMEOUT_S)
    try:
        dset = datasets.load_dataset(ds.path, ds.name, split=ds.split, revision=sha or ds.revision)
    except ConnectionError as e:  # datasets' "Couldn't reach ... on the Hub", OfflineModeIsEnabled
        raise _unreachable(ds, str(e)) from e
    return dset.to_list(), {"path": ds.path, "name": ds.name, "split": ds.split, "revision": ds.revision, "sha": sha}


# --------------------------------------------------------------------------- schemas

Schema = Literal["gsm8k", "mmlu", "truthfulqa_mc"]
_KEYS: dict[str, tuple[str, ...]] = {
    "gsm8k": ("question", "answer"),
    "mmlu": ("question", "subject", "choices", "answer"),
    "truthfulqa_mc": ("question", "mc1_targets", "mc2_targets"),
}
MMLU_N_CHOICES = 4


def _fail(where: str, i: int, msg: str) -> ValueError:
    return ValueError(f"{where}: row {i}: {msg}")


def _check_keys(row: Any, keys: Sequence[str], where: str, i: int, what: str = "row") -> None:
    if not isinstance(row, Mapping):
        raise _fail(where, i, f"{what} must be an object, got {type(row).__name__}")
    missing = [k for k in keys if k not in row]
    extra = [k for k in row if k not in keys]
    if missing or extra:
        raise _fail(where, i, f"{what} keys differ from {list(keys)}: missing {missing}, unexpected {extra}")


def _check_str(value: Any, key: str, where: str, i: int) -> None:
    if not isinstance(value, str):
        raise _fail(where, i, f"key {key!r} must be a string, got {value!r}")


def _check_str_list(value: Any, key: str, where: str, i: int) -> None:
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise _fail(where, i, f"key {key!r} must be a list of strings, got {value!r}")


def _check_targets(targets: Mapping[str, Any], key: str, where: str, i: int) -> None:
    _check_keys(targets, ("choices", "labels"), where, i, what=f"key {key!r}")
    choices, labels = targets["choices"], targets["labels"]
    _check_str_list(choices, f"{key}.choices", where, i)
    if not isinstance(labels, list) or any(isinstance(v, bool) or v not in (0, 1) for v in labels):
        raise _fail(where, i, f"key '{key}.labels' must be a list of 0/1 ints, got {labels!r}")
    if len(choices) != len(labels) or not choices:
        raise _fail(where, i, f"key {key!r}: {len(choices)} choices but {len(labels)} labels")
    n_true = sum(labels)
    if n_true == 0:
        raise _fail(where, i, f"key '{key}.labels' has no 1: {labels!r}")
    if key == "mc1_targets" and n_true != 1:
        raise _fail(where, i, f"key 'mc1_targets.labels' must have exactly one 1, got {labels!r}")


def validate_rows(rows: Sequence[Mapping[str, Any]], schema: Schema, where: str) -> None:
    """Check every row's keys (exactly) and value types against the Hub feature layout of `schema`.

    gsm8k: question, answer strings. mmlu: question, subject strings, 4 string choices, answer int 0-3.
    truthfulqa_mc: question string; mc1_targets/mc2_targets {choices: [str], labels: [0/1]} of equal
    non-zero length with at least one 1 (exactly one for mc1). Raises ValueError naming `where`, the row
    index and the bad key/value."""
    if schema not in _KEYS:
        raise ValueError(f"{where}: unknown schema {schema!r}; expected one of {sorted(_KEYS)}")
    keys = _KEYS[schema]
    for i, row in enumerate(rows):
        _check_keys(row, keys, where, i)
        _check_str(row["question"], "question", where, i)
        if schema == "gsm8k":
            _check_str(row["answer"], "answer", where, i)
        elif schema == "mmlu":
            _check_str(row["subject"], "subject", where, i)
            _check_str_list(row["choices"], "choices", where, i)
            if len(row["choices"]) != MMLU_N_CHOICES:
                raise _fail(where, i, f"key 'choices' must have 4 items, got {len(row['choices'])}")
            answer = row["answer"]
            if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < MMLU_N_CHOICES:
                raise _fail(where, i, f"key 'answer' must be an int 0-3, got {answer!r}")
        else:
            _check_targets(row["mc1_targets"], "mc1_targets", where, i)
            _check_targets(row["mc2_targets"], "mc2_targets", where, i)


def select_mmlu(
    rows: Sequence[Mapping[str, Any]], subjects: Sequence[str], per_subject: int | None
) -> list[dict[str, Any]]:
    """The rows of `subjects`, in file order, keeping the first `per_subject` of each (None = all).

    Raises ValueError for a duplicated subject, a subject with no rows, or one with fewer than
    `per_subject` rows (a named subset must have the counts it claims)."""
    if per_subject is not None and per_subject < 1:
        raise ValueError(f"per_subject must be >= 1 or None, got {per_subject!r}")
    wanted = list(subjects)
    dupes = sorted({s for s in wanted if wanted.count(s) > 1})
    if dupes:
        raise ValueError(f"MMLU subjects listed more than once: {dupes}")
    kept: dict[str, int] = dict.fromkeys(wanted, 0)
    available: dict[str, int] = dict.fromkeys(wanted, 0)
    out: list[dict[str, Any]] = []
    for row in rows:
        s = row["subject"]
        if s not in kept:
            continue
        available[s] += 1
        if per_subject is None or kept[s] < per_subject:
            kept[s] += 1
            out.append(dict(row))
    empty = [s for s in wanted if available[s] == 0]
    if empty:
        raise ValueError(f"MMLU subjects with no rows: {empty}")
    short = {s: n for s, n in available.items() if per_subject is not None and n < per_subject}
    if short:
        raise ValueError(f"MMLU subjects with fewer than per_subject={per_subject} rows: {short}")
    return out
