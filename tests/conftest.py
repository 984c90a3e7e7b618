"""Shared fixtures: a tiny byte-level BPE tokenizer and a tiny random Qwen3ForCausalLM (fast on a CPU)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from poststate.rehearsal import merge  # params overrides merged as the rehearsal merges them

EOS = "<|endoftext|>"  # Qwen3-Base convention: EOS doubles as the pad token
TOKENIZER_TEXT = [
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have?",
    "Answer: Tom has 3 + 4 = 7 apples.\n#### 7",
    "Q: What is the capital of France?\nA: Paris is the capital of France.",
    "The following are multiple choice questions (with answers) about high school math.",
    "A. one\nB. two\nC. three\nD. four\nAnswer: B",
    "She sold 48 clips in April and half as many in May, 72 clips in all.",
]


def build_tiny_tokenizer(pad_token: str = EOS, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on a few sentences: any text round-trips. `pad_token` != EOS adds a pad token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [EOS] if pad_token == EOS else [EOS, pad_token]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_TEXT, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=pad_token, clean_up_tokenization_spaces=False
    )


def build_tiny_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, init_std: float = 0.02) -> Qwen3ForCausalLM:
    """A random Qwen3ForCausalLM with ~20k parameters, fp32, in eval mode. A larger `init_std` than the
    default 0.02 gives peaked, varied next-token distributions (the default is nearly uniform)."""
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=64,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()


def load_stage(name: str):
    """A stage script (stages/<name>.py) as a module, to call its functions in-process. It is registered in
    sys.modules, as `python stages/<name>.py` registers __main__, so that a stage's forked worker processes
    (`poststate.pool`) can be handed its functions by name."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "stages" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"stage_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def give_lora_weights(model, std: float = 0.2) -> None:
    """peft initialises lora_B = 0, a no-op adapter: give it random weights, as training would."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer) -> Qwen3ForCausalLM:
    return build_tiny_model(tiny_tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer_with_pad() -> PreTrainedTokenizerFast:
    """Same as `tiny_tokenizer` but with a separate `<pad>` token (pad != EOS)."""
    return build_tiny_tokenizer(pad_token="<pad>")


@pytest.fixture
def one_thread():
    """torch on one intra-op thread during the test. The tiny model's ops are far too small to split over
    threads: on this 2-core machine under load (load average ~13), a rollout test took 0.58 s of CPU and
    2.4 s of wall time with one thread against 3.9 s and 15.6 s with two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- the tiny DAG at a test size

ROOT = Path(__file__).resolve().parents[1]
SMALL = {  # merged onto params.yaml: every stage runs, in ~2 min on 2 cores
    "prepare": {"world": {"n_corpus_docs": 1500, "n_towns": 8, "n_rivers": 4, "n_creatures": 8, "n_guilds": 6,
                          "n_founders": 6, "gsm8k_n_sft": 64, "gsm8k_n_prompts": 32, "gsm8k_n_fewshot": 8,
                          "gsm8k_n_test": 24, "mmlu_n_test": 24, "mmlu_n_dev_per_subject": 2, "tqa_n_items": 16,
                          "gsm8k_n_sft_heldout": 8, "gsm8k_n_prompts_heldout": 8}},
    "base": {"model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                       "head_dim": 16, "intermediate_size": 64, "vocab_size": 300},
             "pretrain": {"steps": 12, "batch_size": 8, "seq_len": 64, "max_len": 64}},
    "sft": {"batch_size": 16, "stress": {"epochs": 1}},
    "opd": {"steps": 2, "prompts_per_step": 4, "rollout": {"max_new_tokens": 24}, "continuation": {"length": 4}},
    "rl": {"steps": 2, "prompts_per_step": 2, "group_size": 4, "gate_samples": 2, "rollout": {"max_new_tokens": 24}},
    "eval": {"harness": {"gsm8k_max_new_tokens": 24}, "drift": {"prompts": 8, "cuts": 2, "permutations": 99,
                                                                 "rollout": {"max_new_tokens": 24}, "locality_states": 16}},
}


def sh(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """`cmd` in `cwd` with this environment's dvc and python on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert not check or proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="session")
def published_repo(tmp_path_factory) -> Path:
    """A copy of this repository's files at SMALL's size, reproduced with `dvc repro` and committed (what a
    user clones). Tests may rerun stages in it only when the outputs come out the same; to change it, copy it."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    dest = tmp_path_factory.mktemp("published") / "repo"
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True)
    for rel in tracked.stdout.split():
        if (ROOT / rel).is_file() and not rel.startswith(("metrics/", "resolved/")) and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), SMALL)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "code"], ["dvc", "repro"],
                ["git", "add", "-A"], [*git, "commit", "-qm", "dvc repro"]):
        sh(cmd, dest)
    return dest
