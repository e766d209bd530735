"""Studies: one sweep per claim of the papers, on MNIST-1D, with verdicts computed from bootstrap intervals.

``sgdlab study NAME [--quick]`` runs the study's sweep, its analyses (sharpness, interpolation), the
report, and writes ``verdicts.json``; ``sgdlab study all`` runs them all and writes one summary. Every
verdict comes from :mod:`sgdlab.experiments.verdict` applied to a 95% bootstrap interval of a
difference between groups, paired by seed (same initialisation, same data stream where the sampler
allows). ``--quick`` uses few seeds and short runs (about a minute per study on two CPU cores); its
verdicts are often ``inconclusive`` by design: the full study has the seeds to decide.

The studies (papers/ in the project's shared folder; METHODS.md sections in brackets):

- ``srs`` (SRS paper, Table 3 design scaled down [1]): sequenced-replacement sampling vs epoch-wise
  sampling, batch 32, the late step schedule (drops at 60%, 75%, 87.5% of the run), same steps.
- ``shake`` (Shake-Shake, Table 1 [2]): Shake-Shake-Image vs Even-Even-Batch on ``shake_resnet1d``.
- ``random_gradient`` (Random Gradient [3]): the loss times U[0,1) per step vs the plain loss, momentum
  0.9; training loss (full training set) at a quarter of the run and averaged over the run.
- ``importance`` (Katharopoulos & Fleuret [4]): importance sampling with presampling vs uniform
  sampling (epoch-wise and with replacement) at equal wall-clock time; final training loss.
- ``batch_size`` (lecture notes, Keskar et al. [5]): test accuracy and Keskar sharpness of small- vs
  large-batch solutions at equal epochs (Adam, one learning rate), plus the interpolation between them.
- ``scaling`` (lecture notes, Goyal et al. [5]): lr = base * k with gradual warmup at batch 32 k; accuracy
  within 2 points of k = 1 at moderate k, degraded at the largest k.
- ``optimal_batch`` (lecture notes Fig. 7, Smith & Le [5]): the batch size of best test accuracy grows
  with the learning rate and with the training set size (grid lr x batch x N).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from . import aggregate as agg
from .report import Block, Section, difference, fmt, render, write_report
from .sweep import Point, run_sweep
from .verdict import INCONCLUSIVE, Verdict, decide, decide_equivalence

__all__ = ["STUDIES", "Claim", "Study", "names", "run_all", "run_study", "verdict_table"]


@dataclass
class Claim:
    """A directional (or equivalence) claim: ``metric`` of ``treatment`` vs ``baseline`` (group labels)."""

    text: str
    metric: str
    treatment: str
    baseline: str
    direction: int = -1
    margin: float | None = None  # set: an equivalence claim within +-margin

    def judge(self, study: str, vals: dict[str, dict[int, float]]) -> Verdict:
        a, b = vals.get(self.treatment) or {}, vals.get(self.baseline) or {}
        n = min(len(a), len(b))
        if n == 0:
            return Verdict(study, self.text, self.metric, math.nan, math.nan, math.nan, 0, INCONCLUSIVE,
                           "no completed trials")
        d = difference(vals, self.treatment, self.baseline)
        if self.margin is not None:
            v = decide_equivalence(d.ci_low, d.ci_high, self.margin, harmful=-self.direction, n=n)
            rule = f"95% CI of {self.treatment} - {self.baseline} within +-{self.margin:g}"
        else:
            v = decide(d.ci_low, d.ci_high, self.direction, n=n)
            rule = (f"95% CI of {self.treatment} - {self.baseline} "
                    f"{'< 0' if self.direction < 0 else '> 0'}")
        return Verdict(study, self.text, self.metric, d.estimate, d.ci_low, d.ci_high, n, v, rule)


@dataclass
class Study:
    """A claim's experiment: base config, labelled grid points, seeds and budgets for quick/full, claims."""

    name: str
    title: str
    paper: str
    base: Callable[[bool], dict]
    points: Callable[[bool], list[Point]]
    seeds: tuple[int, int]
    claims: Callable[[bool], list[Claim]]
    metrics: Sequence[str] = ("test_error", "test_loss", "wall_time")
    figures: Sequence[tuple[str, str]] = (("test_error", "epoch"), ("train_loss", "epoch"))
    baseline: str | None = None
    analyze: Callable | None = None   # (study, out, trials, quick) -> None; writes RUN/analysis/study.json
    extra: Callable | None = None     # (study, out, trials, quick) -> (verdicts, sections)


def _base(model: dict, batch: int, duration: str, *, lr: float = 0.05, momentum: float = 0.9,
          wd: float = 5e-4, schedule: dict | None = None, eval_every: int = 100, train_eval: bool = False,
          sampler: dict | None = None, optim: dict | None = None) -> dict:
    return {
        "device": "cpu", "duration": duration, "data": {"name": "mnist1d"}, "model": model,
        "sampler": dict({"name": "epoch", "batch_size": batch}, **(sampler or {})),
        "optim": dict({"name": "sgd", "lr": lr, "momentum": momentum, "weight_decay": wd}, **(optim or {})),
        "schedule": schedule or {"name": "constant"},
        "eval": {"every": eval_every, "batch_size": 1000, "train": train_eval},
        "checkpoint": {"every": 500}, "log": {"every": 10, "progress": False},
    }


# ---------------------------------------------------------------------------------------------------
# srs
# ---------------------------------------------------------------------------------------------------

def _srs_base(quick: bool) -> dict:
    # SRS paper Table 3: lr divided by 10 at 120/150/175 of 200 effective epochs (60%, 75%, 87.5%).
    return _base({"name": "cnn1d"}, 32, "12 epochs" if quick else "40 epochs", lr=0.05,
                 schedule={"name": "multistep", "unit": "fraction", "milestones": [0.6, 0.75, 0.875],
                           "factor": 0.1}, eval_every=125)


STUDY_SRS = Study(
    "srs", "SRS beats epoch-wise sampling at a matched schedule",
    "Sequenced-Replacement Sampling (ICLR 2019 submission), Table 3 design on MNIST-1D",
    _srs_base,
    lambda q: [Point({"sampler.name": "epoch"}, "epoch"), Point({"sampler.name": "srs"}, "srs")],
    (5, 16),
    lambda q: [Claim("SRS lowers the test error vs epoch-wise sampling (same steps, late schedule)",
                     "test_error", "srs", "epoch", -1)],
    figures=(("test_error", "epoch"), ("train_loss", "epoch")), baseline="epoch")


# ---------------------------------------------------------------------------------------------------
# shake
# ---------------------------------------------------------------------------------------------------

SSI = {"forward": "shake", "backward": "shake", "level": "image"}
EEB = {"forward": "even", "backward": "even", "level": "batch"}


def _shake_base(quick: bool) -> dict:
    # Shake-Shake CIFAR-10 recipe scaled down: SGD Nesterov 0.9, wd 1e-4, cosine to 0 per step.
    return _base({"name": "shake_resnet1d", "depth": 8, "width": 12 if quick else 16}, 64,
                 "5 epochs" if quick else "30 epochs",
                 lr=0.1, wd=1e-4, optim={"nesterov": True}, schedule={"name": "cosine", "unit": "steps"},
                 eval_every=62)


def _shake_extra(study: Study, out: Path, trials: list[dict], quick: bool):
    """The comparison laid out as the paper's Table 1: Forward / Backward / Level and test error (%)."""
    vals = agg.group_values(trials, "test_error")
    rows = []
    for label, mode in (("E-E-B", EEB), ("S-S-I", SSI)):
        if vals.get(label):
            st = agg.summarize(list(vals[label].values()))
            rows.append([mode["forward"].capitalize(), mode["backward"].capitalize(), mode["level"].capitalize(),
                         100 * st.median, 100 * st.mean, f"[{fmt(100 * st.ci_low)}, {fmt(100 * st.ci_high)}]", st.n])
    return [], [Section("Table 1 layout", [Block("table", headers=["Forward", "Backward", "Level", "median error (%)",
                                                                  "mean error (%)", "95% CI", "n"], rows=rows)])]


STUDY_SHAKE = Study(
    "shake", "Shake-Shake (S-S-I) lowers the test error vs Even-Even-Batch",
    "Gastaldi, Shake-Shake regularization (2017), Table 1 on a 1-D Shake-ResNet",
    _shake_base,
    lambda q: [Point({"model.shake": EEB}, "E-E-B"), Point({"model.shake": SSI}, "S-S-I")],
    (4, 16),
    lambda q: [Claim("Shake-Shake-Image lowers the test error vs Even-Even-Batch", "test_error", "S-S-I",
                     "E-E-B", -1)],
    figures=(("test_error", "epoch"), ("train_loss", "epoch")), baseline="E-E-B", extra=_shake_extra)


# ---------------------------------------------------------------------------------------------------
# random gradient
# ---------------------------------------------------------------------------------------------------

def _rg_base(quick: bool) -> dict:
    # Random Gradient recipe: SGD momentum 0.9, poly decay (power 0.9), wd 5e-4, batch 128.
    return _base({"name": "cnn1d"}, 128, "500 steps" if quick else "2000 steps", lr=0.05,
                 schedule={"name": "poly", "unit": "fraction", "power": 0.9}, eval_every=25, train_eval=True)


def _rg_analyze(study: Study, out: Path, trials: list[dict], quick: bool) -> None:
    """Training loss (full training set) at the first evaluation at or after a quarter of the run."""
    for t in trials:
        if t["status"] != "completed":
            continue
        rows = [r for r in t["rows"] if "train_eval_loss" in r]
        if not rows:
            continue
        target = 0.25 * rows[-1]["step"]
        early = next(r for r in rows if r["step"] >= target)
        _write_extra(t, {"train_loss_early": early["train_eval_loss"], "early_step": early["step"]})


STUDY_RG = Study(
    "random_gradient", "Random gradient speeds convergence with momentum",
    "Wei, Random Gradient (loss x U[0,1) per step), momentum 0.9",
    _rg_base,
    lambda q: [Point({}, "plain"), Point({"loss.random_gradient": {"low": 0.0, "high": 1.0}}, "random_gradient")],
    (5, 16),
    lambda q: [Claim("random gradient lowers the training loss early (a quarter into the run)",
                     "train_loss_early", "random_gradient", "plain", -1),
               Claim("random gradient lowers the training loss averaged over the run (area under the curve)",
                     "train_loss_auc", "random_gradient", "plain", -1)],
    metrics=("train_loss_early", "train_loss_auc", "train_eval_loss", "test_error"),
    figures=(("train_eval_loss", "step"), ("test_error", "step")), baseline="plain", analyze=_rg_analyze)


# ---------------------------------------------------------------------------------------------------
# importance sampling
# ---------------------------------------------------------------------------------------------------

def _is_base(quick: bool) -> dict:
    # Katharopoulos & Fleuret: batch b, presample B = 5b, tau_th = (B + 3b) / 3b, lr drops by 5 on the
    # wall-clock schedule, equal time budgets.
    return _base({"name": "cnn1d"}, 64, "5 s" if quick else "20 s", lr=0.05,
                 schedule={"name": "multistep", "unit": "fraction", "milestones": [0.6, 0.85], "factor": 0.2},
                 eval_every=50, train_eval=True)


STUDY_IS = Study(
    "importance", "Importance sampling lowers the training loss at equal wall-clock time",
    "Katharopoulos & Fleuret, Not all samples are created equal (ICML 2018), loss vs time",
    _is_base,
    lambda q: [Point({"sampler.name": "epoch"}, "uniform (epoch)"),
               Point({"sampler.name": "replacement"}, "uniform (replacement)"),
               Point({"sampler.name": "importance", "sampler.presample": 320}, "importance")],
    (4, 10),
    lambda q: [Claim("importance sampling lowers the final training loss vs epoch-wise uniform sampling "
                     "(equal wall-clock)", "train_eval_loss", "importance", "uniform (epoch)", -1),
               Claim("importance sampling lowers the final training loss vs uniform sampling with replacement "
                     "(equal wall-clock)", "train_eval_loss", "importance", "uniform (replacement)", -1)],
    metrics=("train_eval_loss", "train_loss_auc", "test_error", "steps"),
    figures=(("train_eval_loss", "time"), ("test_error", "time")), baseline="uniform (epoch)")


# ---------------------------------------------------------------------------------------------------
# batch size: generalization, sharpness, interpolation
# ---------------------------------------------------------------------------------------------------

def _bs_list(quick: bool) -> list[int]:
    # The largest batch is 6.4% of the 4,000 training examples (Keskar et al.'s large batch is 10%), small
    # enough that every size fits the training set in the same epochs (final training loss about 0.06 at
    # B=256), so the comparison is not one of a converged against an unconverged model.
    return [32, 256] if quick else [16, 64, 256]


def _bs_base(quick: bool) -> dict:
    # Keskar et al.'s protocol: Adam, one learning rate for every batch size, equal epochs, no weight decay.
    # (SGD with momentum at one learning rate is either unstable at batch 16 or too slow at batch 256.)
    return _base({"name": "cnn1d"}, 32, "25 epochs" if quick else "60 epochs", lr=5e-3, wd=0.0,
                 optim={"name": "adam", "momentum": 0.0}, eval_every=100)


def _write_extra(trial: dict, values: dict) -> None:
    d = Path(trial["dir"]) / "analysis"
    d.mkdir(exist_ok=True)
    path = d / "study.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    old.update(values)
    tmp = d / ".study.json.tmp"
    tmp.write_text(json.dumps(old, indent=2))
    tmp.replace(path)
    trial["extra"] = old


def _ce(logits, y):
    import torch.nn.functional as F

    return F.cross_entropy(logits, y)


def _bs_analyze(study: Study, out: Path, trials: list[dict], quick: bool) -> None:
    """Keskar sharpness (eps 1e-3, full space) of each solution on 1,000 training examples."""
    import torch

    from .. import analysis, train

    for t in trials:
        if t["status"] != "completed" or "sharpness" in (t.get("extra") or {}):
            continue
        _, model, ds = train.load_run(t["dir"])
        n = 1000 if quick else 2000
        data = (ds.train_x[:n], ds.train_y[:n])
        torch.manual_seed(0)
        s = analysis.model_sharpness(model, _ce, data, eps=1e-3, max_iter=10, seed=0)
        _write_extra(t, {"sharpness": float(s)})


def _bs_extra(study: Study, out: Path, trials: list[dict], quick: bool):
    from .. import analysis, train

    sizes = _bs_list(quick)
    blocks: list[Block] = []
    acc = agg.group_values(trials, "test_acc")
    sharp = agg.group_values(trials, "sharpness")
    labels = [f"B={b}" for b in sizes]
    if all(acc.get(lab) for lab in labels) and all(sharp.get(lab) for lab in labels):
        analysis.plot_sharpness_vs_batch(sizes, [float(np.median(list(acc[lab].values()))) for lab in labels],
                                         {"eps=1e-3": [float(np.median(list(sharp[lab].values())))
                                                       for lab in labels]},
                                         path=out / "accuracy_sharpness_vs_batch.png")
        blocks.append(Block("img", "test accuracy and sharpness against batch size (medians over seeds)",
                            path="accuracy_sharpness_vs_batch.png"))
    small = next((t for t in trials if t["label"] == labels[0] and t["status"] == "completed"), None)
    large = next((t for t in trials if t["label"] == labels[-1] and t["status"] == "completed"
                  and small is not None and t["seed"] == small["seed"]), None)
    if small is not None and large is not None:
        _, m_s, ds = train.load_run(small["dir"])
        _, m_l, _ = train.load_run(large["dir"])
        alphas = np.linspace(-0.5, 1.5, 17 if quick else 33).tolist()
        tr = analysis.interpolate(m_s, m_l, _ce, (ds.train_x, ds.train_y), alphas=alphas)
        te = analysis.interpolate(m_s, m_l, _ce, (ds.test_x, ds.test_y), alphas=alphas)
        analysis.plot_interpolation(tr, te, path=out / "interpolation.png",
                                    labels=(f"B={sizes[0]}", f"B={sizes[-1]}"),
                                    title=f"seed {small['seed']}: B={sizes[0]} (alpha 0) to B={sizes[-1]} (alpha 1)")
        (out / "interpolation.json").write_text(json.dumps({"train": tr, "test": te}, indent=2))
        blocks.append(Block("img", "loss and accuracy along the line from the small-batch (alpha 0) to the "
                                   "large-batch (alpha 1) solution (lecture notes Fig. 5)", path="interpolation.png"))
    return [], [Section("Sharpness and interpolation", blocks)] if blocks else []


STUDY_BS = Study(
    "batch_size", "Small batches find flatter minima and generalize better",
    "Lecture notes: Towards Understanding SGD (Keskar et al.'s experiment), equal epochs",
    _bs_base,
    lambda q: [Point({"sampler.batch_size": b}, f"B={b}") for b in _bs_list(q)],
    (4, 10),
    lambda q: [Claim(f"batch {_bs_list(q)[0]} reaches a higher test accuracy than batch {_bs_list(q)[-1]}",
                     "test_acc", f"B={_bs_list(q)[0]}", f"B={_bs_list(q)[-1]}", +1),
               Claim(f"batch {_bs_list(q)[0]} finds a flatter minimum (lower Keskar sharpness) than batch "
                     f"{_bs_list(q)[-1]}", "sharpness", f"B={_bs_list(q)[0]}", f"B={_bs_list(q)[-1]}", -1)],
    metrics=("test_acc", "sharpness", "train_loss", "test_loss"),
    figures=(("test_error", "epoch"), ("train_loss", "epoch")), analyze=_bs_analyze, extra=_bs_extra)


# ---------------------------------------------------------------------------------------------------
# linear scaling rule with warmup
# ---------------------------------------------------------------------------------------------------

SCALING_BASE_LR, SCALING_BASE_B = 0.02, 32


def _ks(quick: bool) -> list[int]:
    return [1, 4, 32] if quick else [1, 2, 4, 8, 16, 32, 64]


def _scaling_base(quick: bool) -> dict:
    epochs = 16 if quick else 40
    return _base({"name": "cnn1d"}, SCALING_BASE_B, f"{epochs} epochs", lr=SCALING_BASE_LR,
                 schedule={"name": "multistep", "unit": "epochs", "milestones": [epochs // 2, 3 * epochs // 4],
                           "factor": 0.1, "warmup": max(1, epochs // 10)}, eval_every=100)


def _scaling_points(quick: bool) -> list[Point]:
    return [Point({"sampler.batch_size": SCALING_BASE_B * k, "optim.lr": SCALING_BASE_LR * k,
                   "schedule.warmup_from": 1.0 / k}, f"k={k}") for k in _ks(quick)]


def _scaling_extra(study: Study, out: Path, trials: list[dict], quick: bool):
    vals = agg.group_values(trials, "test_acc")
    rows, threshold, broken = [], None, False
    for k in _ks(quick)[1:]:
        if not vals.get(f"k={k}") or not vals.get("k=1"):
            continue
        d = difference(vals, f"k={k}", "k=1")
        holds = d.ci_low > -SCALING_MARGIN
        rows.append([k, SCALING_BASE_B * k, SCALING_BASE_LR * k, d.estimate, f"[{fmt(d.ci_low)}, {fmt(d.ci_high)}]",
                     "yes" if holds else "no"])
        broken = broken or not holds
        if not broken:
            threshold = k
    _scaling_figure(trials, out, quick)
    blocks = [Block("p", f"Accuracy of batch 32k with lr {SCALING_BASE_LR}k (gradual warmup from lr "
                         f"{SCALING_BASE_LR}) minus the k = 1 baseline; the rule 'holds' while the interval's "
                         f"lower end is above -{SCALING_MARGIN}. Largest k where it holds (consecutively): "
                         f"{threshold if threshold else 'none'}."),
              Block("table", headers=["k", "batch", "lr", "accuracy difference", "95% CI", "holds"], rows=rows),
              Block("img", "test accuracy against k (median and range over seeds)", path="scaling.png")]
    return [], [Section("Scaling threshold", blocks)]


def _scaling_figure(trials: list[dict], out: Path, quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vals = agg.group_values(trials, "test_acc")
    ks = [k for k in _ks(quick) if vals.get(f"k={k}")]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    med = [np.median(list(vals[f"k={k}"].values())) for k in ks]
    lo = [min(vals[f"k={k}"].values()) for k in ks]
    hi = [max(vals[f"k={k}"].values()) for k in ks]
    ax.plot(ks, med, "o-")
    ax.fill_between(ks, lo, hi, alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"k (batch {SCALING_BASE_B}k, lr {SCALING_BASE_LR}k)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=110)
    plt.close(fig)


SCALING_MARGIN = 0.02

STUDY_SCALING = Study(
    "scaling", "The linear scaling rule with warmup holds up to a batch-size threshold",
    "Lecture notes (Goyal et al.'s linear scaling rule with gradual warmup), equal epochs",
    _scaling_base, _scaling_points, (4, 8),
    lambda q: [Claim(f"lr x k keeps the accuracy of k = 1 within {SCALING_MARGIN:g} at k = {_ks(q)[1]}",
                     "test_acc", f"k={_ks(q)[1]}", "k=1", +1, margin=SCALING_MARGIN),
               Claim(f"the rule breaks down beyond a threshold: accuracy drops at k = {_ks(q)[-1]}",
                     "test_acc", f"k={_ks(q)[-1]}", "k=1", -1)],
    metrics=("test_acc", "train_loss"), figures=(("test_error", "epoch"),), baseline="k=1", extra=_scaling_extra)


# ---------------------------------------------------------------------------------------------------
# optimal batch size vs learning rate and dataset size
# ---------------------------------------------------------------------------------------------------

def _ob_grid(quick: bool):
    if quick:
        return [0.01, 0.3], [16, 64, 256], [2500, 5000]
    return [0.01, 0.03, 0.1, 0.3], [8, 16, 32, 64, 128, 256, 512], [2500, 5000]


def _ob_base(quick: bool) -> dict:
    # SGD momentum 0.9, constant lr, equal epochs: the noise scale g = lr/(1-m) (N/B - 1) sets the optimum.
    return _base({"name": "mlp"}, 32, "15 epochs" if quick else "20 epochs", momentum=0.9, wd=0.0, eval_every=0)


def _ob_label(lr: float, b: int, n: int) -> str:
    return f"N={n} lr={lr:g} B={b}"


def _ob_points(quick: bool) -> list[Point]:
    lrs, bs, ns = _ob_grid(quick)
    return [Point({"data.num_samples": n, "optim.lr": lr, "sampler.batch_size": b}, _ob_label(lr, b, n))
            for n in ns for lr in lrs for b in bs]


def _ob_extra(study: Study, out: Path, trials: list[dict], quick: bool):
    lrs, bs, ns = _ob_grid(quick)
    vals = agg.group_values(trials, "test_acc")
    cells = [(lr, b, n) for n in ns for lr in lrs for b in bs]
    if any(not vals.get(_ob_label(*c)) for c in cells):
        return [Verdict(study.name, "optimal batch size", "test_acc", math.nan, math.nan, math.nan, 0,
                        INCONCLUSIVE, "missing grid cells")], []
    samples = [np.array(list(vals[_ob_label(*c)].values())) for c in cells]
    index = {c: i for i, c in enumerate(cells)}

    def log_bstar(arrs, lr, n):
        means = [arrs[index[(lr, b, n)]].mean() for b in bs]
        return math.log2(bs[int(np.argmax(means))])

    def d_lr(arrs):
        return float(np.mean([log_bstar(arrs, lrs[-1], n) - log_bstar(arrs, lrs[0], n) for n in ns]))

    def d_n(arrs):
        return float(np.mean([log_bstar(arrs, lr, ns[-1]) - log_bstar(arrs, lr, ns[0]) for lr in lrs]))

    verdicts = []
    nmin = min(len(s) for s in samples)
    for text, fn in ((f"the optimal batch size grows with the learning rate (lr {lrs[0]:g} -> {lrs[-1]:g})", d_lr),
                     (f"the optimal batch size grows with the dataset size (N {ns[0]} -> {ns[-1]})", d_n)):
        est, lo, hi = agg.bootstrap_function(samples, fn, n_boot=1000 if quick else 2000)
        verdicts.append(Verdict(study.name, text, "log2 B* (argmax test_acc)", est, lo, hi, nmin,
                                decide(lo, hi, +1, n=nmin), "95% bootstrap CI of the log2 change of B* > 0"))
    _ob_figure(vals, out, quick)
    rows = []
    for n in ns:
        for lr in lrs:
            means = [np.mean(list(vals[_ob_label(lr, b, n)].values())) for b in bs]
            rows.append([n, lr, bs[int(np.argmax(means))]] + [float(m) for m in means])
    sec = Section("Optimal batch size", [
        Block("img", "test accuracy against batch size per learning rate (lecture notes Fig. 7); one panel per "
                     "dataset size", path="accuracy_vs_batch.png"),
        Block("table", headers=["N", "lr", "B*"] + [f"acc B={b}" for b in bs], rows=rows)])
    return verdicts, [sec]


def _ob_figure(vals, out: Path, quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs, bs, ns = _ob_grid(quick)
    fig, axes = plt.subplots(1, len(ns), figsize=(5 * len(ns), 3.8), sharey=True)
    for ax, n in zip(np.atleast_1d(axes), ns):
        for lr in lrs:
            med = [np.median(list(vals[_ob_label(lr, b, n)].values())) for b in bs]
            ax.plot(bs, med, "o-", label=f"lr={lr:g}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_title(f"N={n} (mnist1d num_samples)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel("test accuracy")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_batch.png", dpi=110)
    plt.close(fig)


STUDY_OB = Study(
    "optimal_batch", "The optimal batch size grows with the learning rate and the dataset size",
    "Lecture notes Fig. 7 (Smith & Le: noise scale lr N / B), SGD momentum 0.9, equal epochs",
    _ob_base, _ob_points, (3, 5), lambda q: [], metrics=("test_acc",), figures=(), extra=_ob_extra)


# The order of ``study all``: the longest (shake-shake) last.
STUDIES: dict[str, Study] = {s.name: s for s in (STUDY_SRS, STUDY_RG, STUDY_IS, STUDY_BS, STUDY_SCALING,
                                                  STUDY_OB, STUDY_SHAKE)}


def names() -> list[str]:
    """The study names, in the order ``study all`` runs them."""
    return list(STUDIES)


def verdict_rows(verdicts: Sequence[Verdict]) -> list[list]:
    return [[v.study, v.claim, v.metric, v.estimate, f"[{fmt(v.ci_low)}, {fmt(v.ci_high)}]", v.n, v.verdict]
            for v in verdicts]


VERDICT_HEADERS = ["study", "claim", "metric", "difference", "95% CI", "n", "verdict"]


def run_study(name: str, *, quick: bool = False, out=None, jobs: int = 1, progress: bool = True) -> dict:
    """Run study ``name`` into ``out`` (default ``runs/studies/<name>[-quick]``): sweep, analyses, report, verdicts.

    Returns ``{"name", "verdicts": [Verdict], "report": {"markdown", "html"}, "seconds"}`` and writes
    ``verdicts.json`` next to the report.
    """
    if name not in STUDIES:
        raise ConfigError(f"unknown study {name!r}; known: {', '.join(STUDIES)} (or 'all')")
    study = STUDIES[name]
    out = Path(out) if out is not None else Path("runs/studies") / (name + ("-quick" if quick else ""))
    t0 = time.perf_counter()
    seeds = study.seeds[0] if quick else study.seeds[1]
    run_sweep(study.base(quick), study.points(quick), seeds, out, jobs=jobs, progress=progress,
              extra_manifest={"study": name, "quick": quick})
    trials = agg.load_trials(out)
    if study.analyze is not None:
        study.analyze(study, out, trials, quick)
        trials = agg.load_trials(out)
    verdicts: list[Verdict] = []
    for c in study.claims(quick):
        verdicts.append(c.judge(name, agg.group_values(trials, c.metric)))
    sections: list[Section] = []
    if study.extra is not None:
        more, sections = study.extra(study, out, trials, quick)
        verdicts += more
    lead = [Section("Claim and verdicts", [
        Block("p", f"{study.title}. Source: {study.paper}. Mode: {'quick' if quick else 'full'}, {seeds} seeds "
                   f"per group. A verdict is 'supported' when the 95% bootstrap interval of the difference "
                   f"excludes 0 in the claimed direction, 'contradicted' when it excludes 0 in the other, "
                   f"else 'inconclusive'."),
        Block("table", headers=VERDICT_HEADERS, rows=verdict_rows(verdicts))])]
    report = write_report(out, baseline=f"label={study.baseline}" if study.baseline else None,
                          metrics=study.metrics, title=f"Study '{name}': {study.title}", figures=study.figures,
                          lead=lead, sections=sections)
    seconds = time.perf_counter() - t0
    (out / "verdicts.json").write_text(json.dumps({"study": name, "quick": quick, "seeds": seeds,
                                                   "seconds": seconds,
                                                   "verdicts": [v.as_dict() for v in verdicts]}, indent=2,
                                                  default=str))
    return {"name": name, "verdicts": verdicts, "report": report, "seconds": seconds, "out": out}


def verdict_table(verdicts: Sequence[Verdict], title: str = "Verdicts"):
    """A rich table of verdicts (colour by outcome)."""
    from rich.table import Table

    colours = {"supported": "green", "contradicted": "red", "inconclusive": "yellow"}
    table = Table(title=title, show_lines=False)
    for h in VERDICT_HEADERS:
        table.add_column(h, overflow="fold", justify="left" if h in ("study", "claim", "metric") else "right")
    for r in verdict_rows(verdicts):
        r = [fmt(x) for x in r]
        r[-1] = f"[{colours.get(r[-1], 'white')}]{r[-1]}[/]"
        table.add_row(*r)
    return table


def run_all(*, quick: bool = False, out=None, jobs: int = 1, progress: bool = True,
            only: Sequence[str] | None = None, console=None) -> dict:
    """Run every study (or those in ``only``) into ``out`` (default ``runs/studies``) and write
    ``summary[-quick].md`` / ``.html`` with the verdict table and links to each study's report."""
    root = Path(out) if out is not None else Path("runs/studies")
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for name in (only or names()):
        sub = root / (name + ("-quick" if quick else ""))
        if console is not None:
            console.rule(f"study {name}")
        results.append(run_study(name, quick=quick, out=sub, jobs=jobs, progress=progress))
    verdicts = [v for r in results for v in r["verdicts"]]
    total = sum(r["seconds"] for r in results)
    rows = [[r["name"], f"{r['seconds']:.0f} s", Path(r["report"]["html"]).relative_to(root).as_posix()]
            for r in results]
    sections = [Section("Verdicts", [
        Block("p", f"Mode: {'quick (few seeds, short runs: expect inconclusive verdicts)' if quick else 'full'}. "
                   f"Total time {total:.0f} s."),
        Block("table", headers=VERDICT_HEADERS, rows=verdict_rows(verdicts))]),
        Section("Reports", [Block("table", headers=["study", "time", "report"], rows=rows)])]
    md, h = render("sgdlab studies: the papers' claims on MNIST-1D", sections)
    stem = "summary-quick" if quick else "summary"
    (root / f"{stem}.md").write_text(md)
    (root / f"{stem}.html").write_text(h)
    (root / f"{stem}.json").write_text(json.dumps({"quick": quick, "seconds": total,
                                                   "verdicts": [v.as_dict() for v in verdicts]}, indent=2,
                                                  default=str))
    return {"results": results, "verdicts": verdicts, "seconds": total,
            "summary": {"markdown": root / f"{stem}.md", "html": root / f"{stem}.html"}}
