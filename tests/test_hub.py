"""The base from the Hub or a local directory (`poststate.hub`): with neither, the base stage stops at once
with an error naming `base.hub.name` and how to point it at a directory, and writes nothing.

No test here needs the network: "offline" is HF_HUB_OFFLINE=1, "unreachable" is an endpoint on a closed
local port (connection refused), so both paths run the real huggingface_hub client. How fast the stage
fails is a figure for the README (measured by hand), not an assertion."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

from poststate import hub
from tests.conftest import build_tiny_model, build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


def test_offline_hub_id_names_the_param_and_the_way_out(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.BaseUnavailable) as e:
        hub.resolve("Qwen/Qwen3-0.6B-Base", "main")
    assert "base.hub.name = 'Qwen/Qwen3-0.6B-Base'" in str(e.value) and "local directory" in str(e.value)


def test_unreachable_hub_names_the_param(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED)
    with pytest.raises(hub.BaseUnavailable) as e:
        hub.resolve("Qwen/Qwen3-0.6B-Base", "main")
    assert "base.hub.name" in str(e.value) and "unreachable" in str(e.value) and "local directory" in str(e.value)


def test_local_directory_is_validated(tmp_path):
    with pytest.raises(hub.BaseUnavailable, match="no such directory"):
        hub.resolve(str(tmp_path / "absent"), "main")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text("{}")
    with pytest.raises(hub.BaseUnavailable) as e:
        hub.resolve(str(tmp_path / "partial"), "main")
    assert "model.safetensors" in str(e.value) and "tokenizer.json" in str(e.value)
    tok = build_tiny_tokenizer()
    build_tiny_model(tok).save_pretrained(tmp_path / "full")
    tok.save_pretrained(tmp_path / "full")
    assert hub.resolve(str(tmp_path / "full"), "main") == {"name": str(tmp_path / "full"), "revision": None, "sha": None, "source": "local"}


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": CLOSED}], ids=["offline", "unreachable"])
def test_base_stage_without_hub_or_copy_fails_naming_the_param_and_writes_nothing(tmp_path, env):
    (tmp_path / "params.yaml").write_text((ROOT / "profiles" / "paper.yaml").read_text())
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "base.py")], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, **env})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "base.hub.name = 'Qwen/Qwen3-0.6B-Base'" in proc.stderr and "local directory" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
