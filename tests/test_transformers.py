"""Hugging Face transformers: sgdlab's Trainer with every kind of sampler, exact resume through Trainer's
checkpoints; score-driven samplers in any DataLoader; importance scores of sequences and HF outputs.

The resume cases follow the bug report: a tiny BERT (2 layers, from a config) trained 40 steps, 16 batches
per epoch, saving every 8 steps, stopped after the checkpoint at step 24 and resumed from it (the resumed
epoch is the second one).  Exact means the same dataset indices in every micro-batch, the same importance
weights, and bit-identical final weights (dropout on: Trainer's RNG restore is exercised too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from _hf_tiny import SEQ, VOCAB, B, N, TokenData, bert, checkpoint, gpt2, run, same_params

from sgdlab.sampling import (
    EpochSampler,
    ImportanceSampler,
    IndexBatch,
    LoaderPosition,
    OnlineBatchSelection,
    PrioritizedSampler,
    SequencedReplacementSampler,
    WithWeights,
    upper_bound_scores,
)
from sgdlab.sampling.importance import model_scorer, per_example_loss

HERE = Path(__file__).resolve().parent


def _factory(name: str, batch: int = B):
    def make(trainer):
        if name == "srs":
            return SequencedReplacementSampler(N, batch, seed=3)
        if name == "epoch":
            return EpochSampler(N, batch, seed=3)
        # tau_th=0: importance sampling from the second step on, scored with the live model
        return ImportanceSampler(N, batch, presample=4 * batch, score_fn=trainer.score_examples, tau_th=0.0, seed=3)
    return make


def _stop_and_resume(tmp_path, name, workers, stop=24, **kw):
    full = run(tmp_path / "full", _factory(name), workers=workers, **kw)
    first = run(tmp_path / "stopped", _factory(name), workers=workers, stop_at=stop, **kw)
    assert os.path.isfile(os.path.join(checkpoint(tmp_path / "stopped", stop), "sgdlab_sampler.pt"))
    rest = run(tmp_path / "resumed", _factory(name), workers=workers,
               resume=checkpoint(tmp_path / "stopped", stop), **kw)
    return full, first, rest


def _assert_exact(full, first, rest, steps):
    assert len(full[0]) == steps and len(first[0]) + len(rest[0]) == steps
    assert first[0] + rest[0] == full[0]      # the same examples in every micro-batch, none skipped twice
    assert first[1] + rest[1] == full[1]      # the same weights
    assert same_params(rest[2], full[2])      # bit-identical final weights


def test_importance_sampling_in_trainer_resumes_exactly_with_workers(tmp_path):
    full, first, rest = _stop_and_resume(tmp_path, "importance", workers=2)
    _assert_exact(full, first, rest, 40)
    assert full[3].sampler.is_steps == 39                 # importance sampling drew every batch after the first
    assert len({tuple(w) for w in full[1][1:]}) > 30      # ... with weights that differ from batch to batch


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("name", ["srs", "epoch", "importance"])
def test_trainer_resume_after_the_first_epoch_is_exact(tmp_path, name, workers):
    _assert_exact(*_stop_and_resume(tmp_path, name, workers), 40)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["srs", "importance"])
def test_trainer_resume_with_gradient_accumulation_on_a_causal_lm(tmp_path, name):
    # 2 micro-batches per step: checkpoint at step 12 = micro-batch 24, inside the second epoch
    kw = {"model": gpt2, "lm": True, "accumulation": 2, "max_steps": 20, "save_steps": 4, "stop": 12}
    _assert_exact(*_stop_and_resume(tmp_path, name, 2, **kw), 40)


@pytest.mark.slow
def test_trainer_under_torchrun_trains_the_one_process_global_batches_and_resumes_exactly(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "frameworks" / "hf_ddp.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def steps(name):
        ranks = [json.loads((tmp_path / f"{name}-rank{r}.json").read_text()) for r in (0, 1)]
        return [a + b for a, b in zip(*ranks)]   # the global batch: rank 0's slice, then rank 1's

    one = run(tmp_path / "one", _factory("srs", 2 * 2), workers=0, batch_size=4)
    assert steps("full") == one[0]                       # the same global batches as one process
    assert steps("stopped") + steps("resumed") == one[0]
    assert same_params(torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "resumed.pt"))


def test_prepare_loader_inside_trainer_resumes_exactly(tmp_path):
    """A get_train_dataloader override returning prepare_loader's loader (the reported AttributeError)."""
    from transformers import TrainerCallback, TrainingArguments

    from sgdlab.integrations.accelerate import prepare_loader
    from sgdlab.integrations.transformers import Trainer

    class Indexed(TokenData):
        def __getitem__(self, i):
            return {**super().__getitem__(i), "idx": i}

    def once(out, stop=None, resume=None):
        seen = []

        class T(Trainer):
            def get_train_dataloader(self):
                return prepare_loader(self.accelerator, Indexed(), SequencedReplacementSampler(N, B, seed=1),
                                      num_workers=2)

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                inputs = dict(inputs)
                seen.append(inputs.pop("idx").tolist())
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == stop:
                    control.should_training_stop = True

        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=B, max_steps=20, save_steps=6,
                                 learning_rate=0.05, report_to="none", use_cpu=True, seed=0, disable_tqdm=True)
        trainer = T(model=bert(), args=args, train_dataset=Indexed(), callbacks=[Stop()])
        trainer.train(resume_from_checkpoint=resume)
        return seen, trainer.model.state_dict()

    full, w_full = once(tmp_path / "full")
    first, _ = once(tmp_path / "a", stop=18)     # 16 batches per epoch: the resume is in the second epoch
    rest, w_rest = once(tmp_path / "b", resume=checkpoint(tmp_path / "a", 18))
    assert first + rest == full and len(full) == 20
    assert same_params(w_full, w_rest)


def test_trainer_checks_the_sampler(tmp_path):
    from transformers import TrainingArguments

    from sgdlab.integrations.transformers import Trainer

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=B, report_to="none", use_cpu=True)
    t = Trainer(model=bert(), args=args, train_dataset=TokenData(), sampler=EpochSampler(N, B + 1))
    with pytest.raises(ValueError, match="sampler.batch_size"):
        t.get_train_dataloader()
    with pytest.raises(ValueError, match="sampler must be"):
        Trainer(model=bert(), args=args, train_dataset=TokenData(), sampler=3)
    with pytest.raises(ValueError, match="example_loss"):
        Trainer(model=bert(), args=args, train_dataset=TokenData(), sampler=EpochSampler(N, B), example_loss="l1")


@pytest.mark.parametrize("accumulation", [1, 2])
def test_weighted_loss_and_feedback_come_from_the_training_forward(tmp_path, accumulation):
    """compute_loss = mean(w_i * loss_i) (per sequence: mean over its counted tokens), observe gets the upper bound."""
    from transformers import TrainingArguments

    from sgdlab.integrations.transformers import INDEX_KEY, WEIGHT_KEY, Trainer

    observed = {}

    class Spy(ImportanceSampler):
        def observe(self, indices, losses=None, scores=None):
            observed.update(indices=indices, losses=losses, scores=scores)

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=B, report_to="none", use_cpu=True,
                             gradient_accumulation_steps=accumulation)
    model = gpt2()
    model.eval()  # no dropout: the reference forward below sees the same logits
    data = TokenData(lm=True)
    t = Trainer(model=model, args=args, train_dataset=data,
                sampler=Spy(N, B, presample=8, score_fn=lambda i: torch.ones(len(i))))
    t.current_gradient_accumulation_steps = accumulation
    idx = torch.tensor([5, 1, 5, 9])
    w = torch.tensor([0.5, 2.0, 1.0, 0.25])
    batch = {"input_ids": data.ids[idx], "labels": torch.stack([data[int(i)]["labels"] for i in idx]),
             WEIGHT_KEY: w, INDEX_KEY: idx}
    loss = t.compute_loss(model, batch, num_items_in_batch=torch.tensor(28))
    logits = model(input_ids=batch["input_ids"]).logits
    per_seq = per_example_loss(logits, batch["labels"], "causal_lm")
    hf = model(input_ids=data.ids[idx[1:2]], labels=batch["labels"][1:2]).loss   # HF's own mean for one sequence
    torch.testing.assert_close(per_seq[1], hf)
    scaled = t._trainer_skips_ga_division(torch.tensor(28))
    torch.testing.assert_close(loss, (w * per_seq).mean() / (accumulation if scaled else 1))
    assert torch.equal(observed["indices"], idx)
    torch.testing.assert_close(observed["losses"], per_seq.detach())
    torch.testing.assert_close(observed["scores"], upper_bound_scores(logits, batch["labels"], "causal_lm"))


# ---------------------------------------------------------------------------------------------------------
# score-driven samplers in a plain DataLoader
# ---------------------------------------------------------------------------------------------------------


def _scored(name, score_fn):
    if name == "importance":
        return ImportanceSampler(64, 8, presample=16, score_fn=score_fn, tau_th=0.0, seed=1)
    if name == "prioritized":
        return PrioritizedSampler(64, 8, seed=1)
    return OnlineBatchSelection(64, 8, seed=1)


@pytest.mark.parametrize("name,workers", [
    ("importance", 0), ("importance", 2), ("prioritized", 0), ("online", 0),
    pytest.param("prioritized", 2, marks=pytest.mark.slow), pytest.param("online", 2, marks=pytest.mark.slow)])
def test_score_driven_samplers_resume_exactly_behind_a_read_ahead_loader(name, workers):
    """Stop after 11 of 20 steps (8 batches per epoch), resume from LoaderPosition: the same batches, weights and
    model, although the loader with workers had drawn batches ahead (each drawn with the model of its time)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)
    data = WithWeights(torch.utils.data.TensorDataset(x, y))

    def train(stop=None, saved=None):
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 3)

        def score(i):
            with torch.no_grad():
                return upper_bound_scores(model(x[i]), y[i])

        sampler = _scored(name, score)
        position = LoaderPosition(sampler)
        step, seen = 0, []
        if saved is not None:
            position.load_state_dict(saved["position"])
            model.load_state_dict(saved["model"])
            step = saved["step"]
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        while step < 20:
            for xb, yb, w, idx in torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=workers):
                out = model(xb)
                losses = torch.nn.functional.cross_entropy(out, yb, reduction="none")
                (w * losses).mean().backward()
                opt.step()
                opt.zero_grad()
                sampler.observe(idx, losses=losses.detach(), scores=upper_bound_scores(out.detach(), yb))
                position.advance()
                step += 1
                seen.append((idx.tolist(), w.tolist()))
                if step == stop:
                    return seen, {"position": position.state_dict(), "model": model.state_dict(), "step": step}
                if step == 20:
                    break
        return seen, model.state_dict()

    full, w_full = train()
    first, saved = train(stop=11)
    rest, w_rest = train(saved=saved)
    assert first + rest == full
    assert same_params(w_full, w_rest)
    if name != "online":
        assert any(w != [1.0] * 8 for _, w in full)   # the weights reached the loss


def test_index_batches_carry_weights_to_workers():
    s = ImportanceSampler(32, 4, presample=8, score_fn=lambda i: (i % 5 + 1).float(), tau_th=0.0, seed=0)
    s.observe(torch.arange(4), scores=torch.tensor([1.0, 2.0, 3.0, 4.0]))  # tau > 0: importance sampling is on
    batches = list(s)
    assert len(batches) == len(s) == 8 and all(isinstance(b, IndexBatch) and len(b) == 4 for b in batches)
    data = WithWeights([{"v": i} for i in range(32)])
    loaded = list(torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=2))
    for b, got in zip(batches, loaded):
        assert got["index"].tolist() == list(b) and got["v"].tolist() == list(b)
        assert torch.equal(got["weight"], b.weights)
    plain = WithWeights(torch.utils.data.TensorDataset(torch.arange(4) * 10))
    x, w, i = next(iter(torch.utils.data.DataLoader(plain, batch_size=4)))
    assert x.tolist() == [0, 10, 20, 30] and w.tolist() == [1.0] * 4 and i.tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------------------
# scores of sequences, dict batches and ModelOutput
# ---------------------------------------------------------------------------------------------------------


def _lm_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (6, SEQ), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1] = -100             # nothing counted: loss 0, score 0
    labels[2, 5:] = -100
    return ids, labels


@pytest.mark.parametrize("loss", ["causal_lm", "token_cross_entropy"])
def test_sequence_scores_equal_autograd_norms_over_token_logits(loss):
    """The upper bound of a sequence = ||d loss_i / d Z_i||_F with -100 positions masked (autograd, float64)."""
    model = gpt2().double().eval()
    ids, labels = _lm_batch()
    scores = model_scorer(model, lambda i: {"input_ids": ids[i], "labels": labels[i]}, loss=loss)(torch.arange(6))
    z = model(input_ids=ids).logits.detach().requires_grad_(True)
    ref = []
    for i in range(6):
        (g,) = torch.autograd.grad(per_example_loss(z[i:i + 1], labels[i:i + 1], loss).sum(), z)
        ref.append(g[i].norm())
    torch.testing.assert_close(scores, torch.stack(ref).float(), rtol=1e-6, atol=1e-7)
    assert scores[1] == 0 and (scores[[0, 2, 3, 4, 5]] > 0).all()
    if loss == "causal_lm":  # the loss is Hugging Face's own, per sequence
        for i in (0, 2, 3):
            hf = model(input_ids=ids[i:i + 1], labels=labels[i:i + 1]).loss
            ours = per_example_loss(z[i:i + 1], labels[i:i + 1], loss)[0]
            torch.testing.assert_close(ours, hf.to(ours.dtype), rtol=1e-6, atol=1e-6)  # HF computes in float32


def test_model_scorer_takes_dict_batches_and_model_outputs():
    model = bert().eval()
    data = TokenData()
    idx = torch.tensor([3, 7, 7, 0])
    fetch_dict = lambda i: {"input_ids": data.ids[i], "labels": data.y[i]}
    fetch_pair = lambda i: ({"input_ids": data.ids[i]}, data.y[i])
    logits = model(input_ids=data.ids[idx]).logits
    want = upper_bound_scores(logits, data.y[idx])
    for fetch in (fetch_dict, fetch_pair):
        torch.testing.assert_close(model_scorer(model, fetch)(idx), want)
    torch.testing.assert_close(model_scorer(model, fetch_dict, score="loss")(idx),
                               per_example_loss(logits, data.y[idx]).detach())
    # exact per-example gradient norms through dict inputs (torch.func), against a loop of backward passes
    exact = model_scorer(model, fetch_dict, score="gradnorm")(idx[:2])
    for k, i in enumerate(idx[:2].tolist()):
        model.zero_grad()
        per_example_loss(model(input_ids=data.ids[i:i + 1]).logits, data.y[i:i + 1]).sum().backward()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None))
        torch.testing.assert_close(exact[k], norm, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="without the targets"):
        model_scorer(model, lambda i: {"input_ids": data.ids[i]})(idx)
    with pytest.raises(ValueError, match="token ids in"):
        upper_bound_scores(torch.zeros(2, 3, 5), torch.full((2, 3), 7), "token_cross_entropy")


@pytest.mark.slow
def test_trainer_resumes_at_another_world_size(tmp_path):
    """checkpoint-8 of 2 torchrun processes (global batch 4, 2 per device) resumed by 1 and by 4 processes: the
    global batches of an uninterrupted 1-process run, and its final weights within 1e-5 (reduction order)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)

    def fit(name, procs, steps, ckpt=None):
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
            if procs > 1 else [sys.executable]
        cmd = [*launch, str(HERE / "frameworks" / "hf_elastic.py"), str(tmp_path), name, str(steps)]
        proc = subprocess.run(cmd + ([str(ckpt)] if ckpt else []), env=env, capture_output=True, text=True,
                              timeout=600, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        ranks = [json.loads((tmp_path / f"{name}-rank{r}.json").read_text()) for r in range(procs)]
        return [sum((r[i][1] for r in ranks), []) for i in range(len(ranks[0]))]

    full = fit("full", 1, 16)
    assert len(full) == 16
    assert fit("part", 2, 8) == full[:8]
    for procs in (1, 4):
        assert fit(f"resumed{procs}", procs, 16, checkpoint(tmp_path / "part", 8)) == full[8:]
        a = torch.load(tmp_path / "full.pt", weights_only=True)
        b = torch.load(tmp_path / f"resumed{procs}.pt", weights_only=True)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
