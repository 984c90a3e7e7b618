"""Independent random streams: a tuned model's drift rollouts are not sampled with the base's own draws.

The regression this guards: drift rollouts of every run used the base's seed, prompts and batch size, so
a lightly tuned model reproduced the base's samples almost token for token (99.7% agreement for a copy
with 2% weight noise) and its MMD fell below the base-vs-base noise floor. With streams named by (run,
seed, role), a model 2% away from the base agrees with the base's drift rollouts about as often as a second,
independent sample of the base itself does.
"""

import hashlib

import pytest
import torch

from poststate.streams import stream_seed
from tests.conftest import build_tiny_model, load_stage

ROWS = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?"} for a in range(2, 10) for b in range(3, 7)]


class DriftParams:  # the slice of the eval params that `rollouts` reads
    class rollout:
        max_new_tokens, temperature, top_p = 16, 1.0, 1.0


def _agreement(a: list[dict], b: list[dict]) -> float:
    """Share of generated positions where two samples on the same prompts drew the same token."""
    same = total = 0
    for x, y in zip(a, b):
        n = min(len(x["completion_ids"]), len(y["completion_ids"]))
        same += sum(i == j for i, j in zip(x["completion_ids"][:n], y["completion_ids"][:n]))
        total += n
    return same / total


def test_streams_are_distinct_and_stable():
    seeds = {stream_seed("drift", "rollouts", "base", None), stream_seed("drift", "rollouts", "base", "floor"),
             stream_seed("drift", "rollouts", "sft_mild", 0), stream_seed("drift", "rollouts", "sft_mild", 1),
             stream_seed("drift", "rollouts", "rl", 0), stream_seed("train", "rl", 0, "rollouts", 0, 0)}
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)
    # stable: the documented hash, recomputed here (blake2b of the parts' text joined by \x1f, top 63 bits)
    digest = hashlib.blake2b("drift\x1frollouts\x1frl\x1f0".encode(), digest_size=8, person=b"poststate-rng").digest()
    assert stream_seed("drift", "rollouts", "rl", 0) == int.from_bytes(digest, "little") >> 1
    assert stream_seed("a", 1) != stream_seed("a", "1", 0) and stream_seed("ab", "c") != stream_seed("a", "bc")
    # a stream is named by its parts' text: an int and its decimal string, None and "none", name the same one
    assert stream_seed("a", 1) == stream_seed("a", "1") and stream_seed("x", None) == stream_seed("x", "none")
    with pytest.raises(TypeError, match="str, int or None"):
        stream_seed("drift", 1.5)


@pytest.mark.usefixtures("one_thread")
def test_a_model_2_percent_away_draws_as_independently_as_a_second_base_sample(tiny_tokenizer):
    rollouts = load_stage("eval").rollouts
    base = build_tiny_model(tiny_tokenizer, seed=0, init_std=0.2)
    near = build_tiny_model(tiny_tokenizer, seed=0, init_std=0.2)
    with torch.no_grad():  # 2% relative weight noise: a lightly tuned model
        g = torch.Generator().manual_seed(1)
        for p in near.parameters():
            p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=g))
    draw = lambda m, *tag: rollouts(m, tiny_tokenizer, ROWS, DriftParams, 32, stream_seed("drift", "rollouts", *tag))  # noqa: E731
    ref, floor, run = draw(base, "base", None), draw(base, "base", "floor"), draw(near, "sft_mild", 0)
    coupled = draw(near, "base", None)  # the old design: the tuned model sampled with the base's own stream
    base_vs_base, run_vs_base = _agreement(ref, floor), _agreement(ref, run)
    # what the shared stream did: the same draws until the first token where the two models part
    # (0.743 here; this random model is far less peaked than the trained tiny base, which gave 0.997)
    assert _agreement(ref, coupled) > 0.5
    # independent streams: the tuned model agrees with the base as rarely as a second base sample (0.004 vs 0.002)
    assert run_vs_base < 0.05 and abs(run_vs_base - base_vs_base) < 0.02, (run_vs_base, base_vs_base)
