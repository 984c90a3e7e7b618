"""Shared fixtures: a tiny byte-level BPE tokenizer and a tiny random Qwen3ForCausalLM (fast on a CPU)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

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
    """A stage script (stages/<name>.py) as a module, to call its functions in-process."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "stages" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"stage_{name}", path)
    module = importlib.util.module_from_spec(spec)
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
