"""The base model from the Hugging Face Hub or from a local directory, checked before anything runs.

`base.hub.name` is either a Hub repo id ("Qwen/Qwen3-0.6B-Base") or a local directory holding a saved
model (config.json, the weights, the tokenizer files) - for a machine without the Hub, or the CPU scale
rehearsal's random-init Qwen3. A local directory is validated at once; a Hub id is resolved to its commit
sha with one API request (timeout HUB_TIMEOUT_S, no retries), so that with neither the Hub nor a local
copy the stage fails within seconds, naming the param and how to point it at a directory, instead of
retrying downloads for a minute and ending in transformers' generic connection message.
"""

from __future__ import annotations

from pathlib import Path

HUB_TIMEOUT_S = 5.0
PARAM = "base.hub.name"
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER = ("tokenizer.json", "tokenizer_config.json")


class BaseUnavailable(RuntimeError):
    """Neither the Hub nor a local copy can provide the base model."""


def is_local(name: str) -> bool:
    """A local directory (it exists, or is written as a path), not a Hub repo id."""
    return Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") != 1


def check_local(path: Path) -> None:
    """A saved model directory: config.json, the weights and the tokenizer files must be there."""
    if not path.is_dir():
        raise BaseUnavailable(f"{PARAM} = {str(path)!r}: no such directory (a local base must hold config.json, the weights and the tokenizer)")
    missing = [n for n in ("config.json",) if not (path / n).is_file()]
    if not any((path / w).is_file() for w in WEIGHTS):
        missing.append(" or ".join(WEIGHTS))
    missing += [n for n in TOKENIZER if not (path / n).is_file()]
    if missing:
        raise BaseUnavailable(f"{PARAM} = {str(path)!r}: the directory lacks {', '.join(missing)}")


def resolve(name: str, revision: str) -> dict:
    """{"name", "revision", "sha", "source"} of the base: a local directory (validated; sha None) or a Hub
    model at `revision`, resolved to its commit sha. Raises BaseUnavailable naming base.hub.name."""
    if is_local(name):
        check_local(Path(name).expanduser())
        return {"name": name, "revision": None, "sha": None, "source": "local"}
    import httpx2
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError

    hint = (f"set {PARAM} in params.yaml to a local directory holding the model (config.json, weights, tokenizer "
            f"files, e.g. one written by `save_pretrained`), or run where {constants.ENDPOINT} is reachable")
    if constants.HF_HUB_OFFLINE:
        raise BaseUnavailable(f"{PARAM} = {name!r}: HF_HUB_OFFLINE is set, so the Hub cannot resolve it; {hint}")
    try:
        info = HfApi().model_info(name, revision=revision, timeout=HUB_TIMEOUT_S)
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise BaseUnavailable(f"{PARAM} = {name!r} at revision {revision!r}: not found on the Hub ({type(e).__name__})") from e
    except (httpx2.TransportError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as e:  # httpx2: huggingface_hub 2.x's client
        raise BaseUnavailable(f"{PARAM} = {name!r}: the Hub is unreachable ({type(e).__name__}: {str(e)[:200]}); {hint}") from e
    return {"name": name, "revision": revision, "sha": info.sha, "source": "hub"}
