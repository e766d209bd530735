"""Importance sampling with the upper bound (Katharopoulos & Fleuret, ICML 2018): three ratios in one run.

(a) time to score a presample with the upper bound (eq. 19) / time of a plain no-grad forward pass of
    the same presample                                                    target <= 1.15
    and the same for a tiny GPT-2 language model (Hugging Face transformers, from a config; dict batches,
    ModelOutput, the sequence bound over all token logits with -100 labels masked)  target <= 1.15
(b) time of exact per-example gradient norms (torch.func) / time of the upper bound   target >= 10
(c) at an equal wall-clock budget on MNIST-1D, final training loss of importance sampling / that of
    uniform sampling (epoch-wise shuffling), with test errors, over 3 seeds (the paper's claim, section 4:
    lower training loss at equal time, section 4).

Usage: python benchmarks/importance.py [--quick] [--seconds S] [--seeds N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import sgdlab.data
import sgdlab.models
from sgdlab.sampling.importance import model_scorer


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def scoring_ratios(model_name: str, presample: int, reps: int) -> tuple[float, float, dict]:
    ds = sgdlab.data.create("mnist1d")
    torch.manual_seed(0)
    model = sgdlab.models.create(model_name, num_classes=ds.num_classes)
    model.train()
    x, y = ds.train_x, ds.train_y
    idx = torch.randint(len(y), (presample,), generator=torch.Generator().manual_seed(0))

    def fetch(i):
        return x[i], y[i]

    upper = model_scorer(model, fetch, score="upper_bound")
    exact = model_scorer(model, fetch, score="gradnorm", chunk_size=256)

    def forward():
        model.eval()
        with torch.no_grad():
            xb, _ = fetch(idx)
            model(xb)
        model.train()

    # interleave the measurements in blocks so machine load affects all of them alike; best block each
    t_fwd, t_ub, t_gn = [], [], []
    for _ in range(3):
        t_fwd.append(_median_time(forward, reps))
        t_ub.append(_median_time(lambda: upper(idx), reps))
        t_gn.append(_median_time(lambda: exact(idx), max(3, reps // 5)))
    t_fwd, t_ub, t_gn = min(t_fwd), min(t_ub), min(t_gn)
    return t_ub / t_fwd, t_gn / t_ub, {"forward_s": t_fwd, "upper_bound_s": t_ub, "gradnorm_s": t_gn}


def gpt2_scoring_ratio(presample: int, reps: int, seq: int = 32) -> tuple[float, dict] | None:
    """Upper-bound scoring of ``presample`` sequences of a tiny GPT-2 / a no-grad forward of them."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=1000, n_positions=seq, n_embd=64, n_layer=2, n_head=2, bos_token_id=0,
                     eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (4 * presample, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 4] = -100  # a prompt that is not counted
    idx = torch.randint(len(ids), (presample,), generator=g)

    def fetch(i):
        return {"input_ids": ids[i], "labels": labels[i]}

    upper = model_scorer(model, fetch, loss="causal_lm")

    def forward():
        with torch.no_grad():
            model(input_ids=fetch(idx)["input_ids"])

    t_fwd, t_ub = [], []
    for _ in range(3):
        t_fwd.append(_median_time(forward, reps))
        t_ub.append(_median_time(lambda: upper(idx), reps))
    t_fwd, t_ub = min(t_fwd), min(t_ub)
    return t_ub / t_fwd, {"forward_s": t_fwd, "upper_bound_s": t_ub, "seq": seq, "vocab": cfg.vocab_size}


def equal_time(seconds: float, seeds: int, model_name: str) -> tuple[str, list[dict]]:
    from sgdlab import train

    base = {
        "device": "cpu", "duration": f"{seconds} s",
        "data": {"name": "mnist1d"}, "model": {"name": model_name},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4},
        "schedule": {"name": "multistep", "unit": "fraction", "milestones": [0.5, 0.8], "factor": 0.2},
        "eval": {"every": 0, "batch_size": 1000, "train": True}, "checkpoint": {"every": 0},
        "log": {"every": 50, "progress": False},
    }
    samplers = {"uniform": {"name": "epoch", "batch_size": 64},
                "importance": {"name": "importance", "batch_size": 64, "presample": 320}}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for seed in range(seeds):
            for name, sampler in samplers.items():
                cfg = {**base, "seed": seed, "sampler": sampler}
                s = train.run(cfg, Path(d) / f"{name}-{seed}", quiet=True)
                f = s["final"]
                rows.append({"seed": seed, "sampler": name, "steps": s["steps"],
                             "train_loss": f["train_eval_loss"], "test_error": 1 - f["test_acc"]})
    return "sgdlab.train.run (the engine), duration in seconds", rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter runs (about a minute in all)")
    ap.add_argument("--seconds", type=float, default=None, help="training budget per run for (c)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--model", default="cnn1d", choices=["cnn1d", "mlp"])
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every measurement")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seconds = args.seconds or (6.0 if args.quick else 20.0)
    reps = 10 if args.quick else 30

    ra, rb, raw = scoring_ratios(args.model, 1024, reps)
    print(f"model {args.model}, presample 1024, {args.threads} thread(s)")
    print(f"(a) upper-bound scoring / no-grad forward : {ra:6.3f}   (target <= 1.15)  "
          f"[{raw['upper_bound_s'] * 1e3:.2f} ms vs {raw['forward_s'] * 1e3:.2f} ms]")
    print(f"(b) exact gradient norms / upper bound     : {rb:6.1f}   (target >= 10)    "
          f"[{raw['gradnorm_s'] * 1e3:.1f} ms]")

    gpt = gpt2_scoring_ratio(256, reps)
    if gpt is None:
        print("(a) tiny GPT-2: skipped (pip install 'sgdlab[transformers]')")
    else:
        r, raw = gpt
        print(f"(a) tiny GPT-2 (2 layers, width 64, vocab {raw['vocab']}, 256 sequences of {raw['seq']} tokens), "
              f"upper-bound scoring / no-grad forward : {r:6.3f}   (target <= 1.15)  "
              f"[{raw['upper_bound_s'] * 1e3:.2f} ms vs {raw['forward_s'] * 1e3:.2f} ms]")

    how, rows = equal_time(seconds, args.seeds, args.model)
    print(f"(c) equal wall-clock budget {seconds:g} s per run on MNIST-1D, {args.seeds} seeds; loop: {how}")
    for r in rows:
        print(f"    seed {r['seed']}  {r['sampler']:10s}  steps {r['steps']:6d}  train loss {r['train_loss']:.4f}  "
              f"test error {r['test_error']:.4f}")

    def mean(name, key):
        v = [r[key] for r in rows if r["sampler"] == name]
        return sum(v) / len(v)

    ratio = mean("importance", "train_loss") / mean("uniform", "train_loss")
    print(f"(c) final training loss, importance / uniform: {ratio:6.3f}   (below 1 means importance sampling wins)")
    print(f"    test error: uniform {mean('uniform', 'test_error'):.4f}, importance {mean('importance', 'test_error'):.4f}")


if __name__ == "__main__":
    main()
