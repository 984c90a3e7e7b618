"""Named random streams: every random draw of the pipeline takes its seed from what it is for.

A seed is `stream_seed(*parts)`, a 63-bit integer hashed (blake2b) from the parts' text, e.g.
`stream_seed("drift", "rollouts", "sft_mild", 0)` for the drift rollouts of sft_mild's seed-0 model, or
`stream_seed("train", "rl", 0, "rollouts", step)` for a training draw. A stream is named by its parts' text
(1 and "1", None and "none", name the same stream). Two streams with different texts cannot share a seed
except by a hash collision (probability ~2^-63 per pair), so a tuned model is never sampled with the
base's own random draws, and no eval stream coincides with a training stream: the samples that an
estimator treats as independent come from independent streams.
"""

from __future__ import annotations

import hashlib

SEED_BITS = 63  # fits torch.manual_seed, numpy's default_rng and random.Random


def stream_seed(*parts: object) -> int:
    """The seed of the stream named by `parts` (strings and integers; None reads as "none")."""
    if not parts:
        raise ValueError("stream_seed needs at least one part naming the stream")
    for p in parts:
        if not isinstance(p, (str, int)) and p is not None or isinstance(p, bool):
            raise TypeError(f"stream_seed parts must be str, int or None, got {p!r} ({type(p).__name__})")
    text = "\x1f".join("none" if p is None else str(p) for p in parts)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"poststate-rng").digest()
    return int.from_bytes(digest, "little") >> (64 - SEED_BITS)
