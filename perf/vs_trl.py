"""Benchmark: one on-policy distillation step and one GRPO step of the same tiny model, through TRL 1.16's
trainers and through poststate's loop, side by side: seconds per optimizer step (median of the timed steps
after warm-up) and their ratio. Sampling design: each round runs poststate and then TRL back to back (one
warm-up step, then the timed steps, in a fresh model and trainer each); a round gives one ratio of the two
sides' median steps, and rounds are the replicates (a shared machine's load drifts between rounds, less
within one).

    python perf/vs_trl.py                      # 2 rounds x (1 warm-up + 3 timed steps) per side and method
    python perf/vs_trl.py --rounds 1 --steps 2 --threads 1
    python perf/vs_trl.py --profile-ours       # also cProfile poststate's steps: where the time goes

The model: the tiny profile's base architecture (params.yaml `base.model`), the trained tiny base and its
tokenizer from models/base when present (else a random init with a tokenizer trained on the prompts); the
teacher: models/teacher/s0 (else models/sft_stress/s0, else a frozen copy of the base). Prompts: the tiny
world's OPD/RL prompt set (data/prepared/gsm8k/prompts.jsonl), else synthetic GSM8K-schema rows.

The pairs, and how their work is matched (each side gets the same prompts, samples per prompt, max new
tokens, temperature 1, top_p 1, no top-k, LoRA config (params.yaml's r/alpha/dropout/targets), micro-batch,
fp32 on a CPU, no gradient checkpointing, no saving, no logging backend):

| poststate                                                    | TRL 1.16                                      |
|--------------------------------------------------------------|-----------------------------------------------|
| OPD `signal: token_kl`, `kl: {direction: reverse, estimator: full}`: the student samples, the loss is the full-vocabulary KL(student || teacher) at every sampled token | `DistillationTrainer` (on-policy by construction, = GKD lmbda 1), `beta=1.0` (reverse KL), the same loss per token |
| RL (`rl` section): prompts_per_step x group_size rollouts, group-relative advantages, `loss_agg` | `GRPOTrainer`, `num_generations=group_size`, `beta=0` (no reference, as kl_coef 0), `loss_type` dapo (token_mean) / grpo (sequence_mean), `scale_rewards="group"` (std_norm) |

The paper's OPD signal (`continuation`: K cuts per rollout, the teacher writes L tokens from each, CE on the
teacher's tokens) has no TRL counterpart; its step time is printed for reference only.

Differences that remain (they are the two designs, not settings): poststate samples from a merged copy of
the LoRA policy (`modeling.SamplingCopy`), TRL through the peft adapter; poststate trains with the LoRA
forward params.yaml sets (`adapter.forward: merged`, x (W + s B A)^T: the same function), TRL with peft's; poststate stops a sample at its
EOS or a GSM8K stop string ("Question:"), TRL at EOS only (so the two may generate different numbers of
tokens from the same model: both counts are printed); poststate applies the LM head at the loss's
positions only, TRL's chunked divergence on a CPU projects every completion position, padding included;
TRL logs per-step metrics (entropy, lengths, rewards) that poststate does not compute.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import pstats
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from poststate.loop import train  # noqa: E402
from poststate.methods import opd_method, rl_method  # noqa: E402
from poststate.modeling import load_tokenizer, tiny_qwen3, train_tokenizer, with_adapter  # noqa: E402
from poststate.params import load_section  # noqa: E402
from poststate.prompts import gsm8k_prompt  # noqa: E402
from poststate.scoring import gsm8k_reward  # noqa: E402


def load_rows(n: int) -> tuple[list[dict], str]:
    path = ROOT / "data" / "prepared" / "gsm8k" / "prompts.jsonl"
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()][:n], str(path.relative_to(ROOT))
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randint(7, 50), rng.randint(2, 6)
        rows.append({"question": f"Mia has {a} apples and buys {b} more. How many apples does Mia have?",
                     "answer": f"Mia has {a} + {b} = {a + b} apples.\n#### {a + b}"})
    return rows, "synthetic rows (no data/prepared/gsm8k/prompts.jsonl)"


def load_models(rows: list[dict]):
    """(tokenizer, base model factory, teacher, where each came from)."""
    from transformers import AutoModelForCausalLM

    base_dir = ROOT / "models" / "base"
    if (base_dir / "config.json").is_file():
        tok = load_tokenizer(base_dir)

        def base():
            return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)

        src = "models/base (the trained tiny base)"
    else:
        spec = yaml.safe_load((ROOT / "params.yaml").read_text())["base"]["model"]
        tok = train_tokenizer([gsm8k_prompt(r["question"], []) + " " + r["answer"] for r in rows] * 4, spec["vocab_size"])

        def base():
            return tiny_qwen3(SimpleNamespace(**spec), tok, seed=0)

        src = "a random init of params.yaml base.model (no models/base)"
    for cand in ("models/teacher/s0", "models/sft_stress/s0"):
        if (ROOT / cand / "config.json").is_file():
            return tok, base, AutoModelForCausalLM.from_pretrained(ROOT / cand, dtype=torch.float32).eval().requires_grad_(False), src, cand
    return tok, base, base().eval().requires_grad_(False), src, "a frozen copy of the base (no teacher model found)"


def lora_config(adapter):
    from peft import LoraConfig

    return LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                      target_modules=list(adapter.target_modules), task_type="CAUSAL_LM")


# --------------------------------------------------------------------------- poststate


def ours(kind: str, p, tok, base, teacher, rows, steps: int, profile: bool) -> dict:
    """`steps` optimizer steps through `loop.train`; per-step seconds from the loop's own clock."""
    if p.adapter.kind != "lora":
        raise ValueError(f"{kind}: adapter.kind = {p.adapter.kind!r}; the comparison runs LoRA on both sides")
    torch.manual_seed(0)  # the LoRA A matrices' init (the stages seed the same way: runs.seed_everything)
    lm = with_adapter(base(), p.adapter)
    if kind == "rl":
        method = rl_method("rl", rows, tok, p, seed=0)
        per_step = p.prompts_per_step * p.group_size
    else:
        method = opd_method("opd", rows, tok, teacher, p, seed=0)
        per_step = p.prompts_per_step
    secs, gen, toks = [], [], []

    def log(_step, _metrics, dt):
        secs.append(dt)
        gen.append(method.source.gen_seconds + getattr(method.signal, "gen_seconds", 0.0))
        toks.append(method.source.generated_tokens + getattr(method.signal, "generated_tokens", 0))

    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    train(lm, method, p, steps, pad_id=tok.pad_token_id, progress=False, log=log)
    if prof:
        prof.disable()
    return {"seconds": secs, "gen_seconds": _deltas(gen), "generated_tokens": _deltas(toks), "sequences_per_step": per_step,
            "profile": prof}


def _deltas(cum: list[float]) -> list[float]:
    return [b - a for a, b in zip([0.0, *cum[:-1]], cum)]


# --------------------------------------------------------------------------- TRL


class StepClock:
    """A TrainerCallback: wall seconds of each optimizer step (on_step_begin .. on_step_end)."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                clock.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                clock.seconds.append(time.perf_counter() - clock.t)

        self.callback = _CB()
        self.seconds: list[float] = []
        self.t = 0.0


def timed(cls):
    """A subclass of a TRL trainer that adds up the time and tokens of its `_generate` calls."""

    class Timed(cls):
        gen_log: list[tuple[float, int]]

        def _generate(self, prompts):
            t = time.perf_counter()
            out = super()._generate(prompts)
            completion_ids = out[1] if isinstance(out, tuple) else out["completion_ids"]
            self.gen_log.append((time.perf_counter() - t, sum(len(c) for c in completion_ids)))
            return out

    Timed.__name__ = f"Timed{cls.__name__}"
    return Timed


def trl_args(common: dict, kind: str, p, steps: int, out_dir: Path):
    shared = dict(
        output_dir=str(out_dir), max_steps=steps, learning_rate=p.lr, lr_scheduler_type="cosine", warmup_steps=p.warmup_ratio,
        weight_decay=p.weight_decay, max_grad_norm=p.max_grad_norm, bf16=False, fp16=False, gradient_checkpointing=False,
        report_to=[], save_strategy="no", logging_steps=10**6, disable_tqdm=True, seed=0, dataloader_num_workers=0,
        temperature=p.rollout.temperature, top_p=p.rollout.top_p, top_k=0, max_completion_length=p.rollout.max_new_tokens,
        disable_dropout=True, **common,
    )
    if kind == "rl":
        from trl import GRPOConfig

        n = p.prompts_per_step * p.group_size
        if n % p.batch_size:
            raise ValueError(f"rl: prompts_per_step x group_size = {n} is not a multiple of the micro-batch {p.batch_size}")
        ga = n // p.batch_size
        return GRPOConfig(per_device_train_batch_size=p.batch_size, gradient_accumulation_steps=ga, steps_per_generation=ga,
                          num_generations=p.group_size, beta=p.kl_coef, epsilon=p.clip_eps, num_iterations=p.inner_steps,
                          loss_type={"token_mean": "dapo", "sequence_mean": "grpo"}[p.loss_agg],
                          scale_rewards="group" if p.std_norm else "none", mask_truncated_completions=False, **shared)
    from trl import DistillationConfig

    if p.prompts_per_step % p.batch_size:
        raise ValueError(f"opd: prompts_per_step {p.prompts_per_step} is not a multiple of the micro-batch {p.batch_size}")
    return DistillationConfig(per_device_train_batch_size=p.batch_size, gradient_accumulation_steps=p.prompts_per_step // p.batch_size,
                              beta={"reverse": 1.0, "forward": 0.0}[p.kl.direction], **shared)


def theirs(kind: str, p, tok, base, teacher, rows, steps: int, scratch: Path) -> dict:
    """`steps` optimizer steps through TRL's trainer; per-step seconds from a callback."""
    from datasets import Dataset

    ds = Dataset.from_list([{"prompt": gsm8k_prompt(r["question"], []), "answer": r["answer"]} for r in rows])
    clock = StepClock()
    args = trl_args({}, kind, p, steps, scratch / f"trl_{kind}")
    trl_tok = copy.deepcopy(tok)
    trl_tok.padding_side = "left"
    if kind == "rl":
        from trl import GRPOTrainer

        def reward(prompts, completions, answer, **_):
            return [gsm8k_reward(c, a) for c, a in zip(completions, answer)]

        trainer = timed(GRPOTrainer)(model=base(), reward_funcs=[reward], args=args, train_dataset=ds, processing_class=trl_tok,
                                     peft_config=lora_config(p.adapter), callbacks=[clock.callback])
    else:
        from trl import DistillationTrainer

        trainer = timed(DistillationTrainer)(model=base(), teacher_model=teacher, args=args, train_dataset=ds.remove_columns("answer"),
                                             processing_class=trl_tok, peft_config=lora_config(p.adapter), callbacks=[clock.callback])
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)  # its end-of-training metrics dict: not ours to print
    trainer.remove_callback(ProgressCallback)
    trainer.gen_log = []
    trainer.train()
    per_gen = max(1, args.gradient_accumulation_steps // getattr(args, "steps_per_generation", args.gradient_accumulation_steps))
    gen = [sum(t for t, _ in trainer.gen_log[i * per_gen : (i + 1) * per_gen]) for i in range(len(clock.seconds))]
    toks = [sum(n for _, n in trainer.gen_log[i * per_gen : (i + 1) * per_gen]) for i in range(len(clock.seconds))]
    return {"seconds": clock.seconds, "gen_seconds": gen, "generated_tokens": toks}


# --------------------------------------------------------------------------- the comparison


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (poststate, TRL) per method")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per round, after one warm-up step")
    ap.add_argument("--methods", nargs="+", default=["opd", "rl"], choices=["opd", "rl"])
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--profile-ours", action="store_true", help="cProfile poststate's timed rounds and print the top functions")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import trl
    import transformers

    rows, rows_src = load_rows(512)
    tok, base, teacher, base_src, teacher_src = load_models(rows)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"{torch.get_num_threads()} CPU threads\nmodel: {base_src}; teacher: {teacher_src}; prompts: {rows_src}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="vs_trl-"))  # TRL's output_dir: it saves nothing here (save_strategy "no")
    params = {
        "opd": load_section("opd", "mild").model_copy(update={"signal": "token_kl"}),
        "rl": load_section("rl"),
    }
    params["opd"] = params["opd"].model_copy(update={"kl": params["opd"].kl.model_copy(update={"direction": "reverse", "estimator": "full"})})
    results: dict[str, dict] = {}
    total = 1 + args.steps
    for kind in args.methods:
        p = params[kind]
        what = (f"OPD token-level reverse KL: {p.prompts_per_step} prompts x 1 sample" if kind == "opd"
                else f"GRPO: {p.prompts_per_step} prompts x {p.group_size} samples, loss {p.loss_agg}")
        print(f"\n== {what}, <= {p.rollout.max_new_tokens} new tokens, temperature {p.rollout.temperature}, LoRA r{p.adapter.r}/"
              f"a{p.adapter.alpha:g}, micro-batch {p.batch_size}; {args.rounds} rounds x ({1} warm-up + {args.steps} timed steps)", flush=True)
        r = {"ours": {"seconds": [], "gen_seconds": [], "generated_tokens": []}, "trl": {"seconds": [], "gen_seconds": [], "generated_tokens": []}}
        round_ratios = []
        profiles = []
        for rnd in range(args.rounds):
            for side in ("ours", "trl"):
                if side == "ours":
                    o = ours(kind, p, tok, base, teacher, rows, total, args.profile_ours)
                    if o["profile"] is not None:
                        profiles.append(o["profile"])
                else:
                    o = theirs(kind, p, tok, base, teacher, rows, total, scratch)
                for k in ("seconds", "gen_seconds", "generated_tokens"):
                    r[side][k] += o[k][1:]  # drop the warm-up step
                print(f"  round {rnd} {side:5s} " + " ".join(f"{s:.2f}" for s in o["seconds"][1:]) + " s/step  (generation "
                      + " ".join(f"{s:.2f}" for s in o["gen_seconds"][1:]) + " s; tokens " + " ".join(f"{n:.0f}" for n in o["generated_tokens"][1:]) + ")",
                      flush=True)
                if side == "ours":
                    ours_round = med(o["seconds"][1:])
                else:
                    round_ratios.append(ours_round / med(o["seconds"][1:]))
        m_o, m_t = med(r["ours"]["seconds"]), med(r["trl"]["seconds"])
        g_o, g_t = med(r["ours"]["gen_seconds"]), med(r["trl"]["gen_seconds"])
        n_o, n_t = med(r["ours"]["generated_tokens"]), med(r["trl"]["generated_tokens"])
        print("  ratio poststate/TRL per round (median step of each side, run back to back): "
              + ", ".join(f"{x:.2f}" for x in round_ratios) + f"; median {med(round_ratios):.2f}")
        print(f"  median s/step over all rounds: poststate {m_o:.3f}, TRL {m_t:.3f}; ratio {m_o / m_t:.2f}")
        print(f"    generation  : poststate {g_o:.3f} s for {n_o:.0f} tokens ({1e3 * g_o / max(n_o, 1):.2f} ms/token), "
              f"TRL {g_t:.3f} s for {n_t:.0f} tokens ({1e3 * g_t / max(n_t, 1):.2f} ms/token)")
        print(f"    the rest    : poststate {m_o - g_o:.3f} s, TRL {m_t - g_t:.3f} s; ratio {(m_o - g_o) / (m_t - g_t):.2f}", flush=True)
        results[kind] = {**r, "median_s": {"ours": m_o, "trl": m_t}, "ratio": m_o / m_t, "round_ratios": round_ratios}
        if profiles:
            out = io.StringIO()
            st = pstats.Stats(profiles[0], stream=out)
            for extra in profiles[1:]:
                st.add(extra)
            st.sort_stats("cumulative").print_stats(30)
            print(f"  cProfile of poststate's {kind} rounds (warm-up steps included), by cumulative time:\n{out.getvalue()}")
    if "opd" in args.methods:
        p = load_section("opd", "mild")
        print(f"\n(reference, no TRL counterpart) the paper's OPD signal `continuation` ({p.continuation.cuts} cuts x "
              f"{p.continuation.length} teacher tokens per rollout), the same student settings:", flush=True)
        c = ours("opd", p, tok, base, teacher, rows, total, False)
        print(f"  poststate continuation: median {med(c['seconds'][1:]):.3f} s/step over {args.steps} steps "
              f"(generation {med(c['gen_seconds'][1:]):.3f} s)", flush=True)
        results["opd_continuation"] = {"seconds": c["seconds"][1:]}
    shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
