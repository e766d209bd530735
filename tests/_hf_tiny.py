"""Tiny Hugging Face models and a Trainer run that records its batches (shared by the transformers tests)."""

from __future__ import annotations

import os

import torch

N, B, VOCAB, SEQ = 64, 4, 100, 8  # 16 batches of 4 per epoch


class TokenData(torch.utils.data.Dataset):
    """``N`` fixed random token sequences with a class label (or their own tokens as LM labels)."""

    def __init__(self, lm: bool = False):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (N, SEQ), generator=g)
        self.y = torch.randint(0, 3, (N,), generator=g)
        self.lm = lm

    def __len__(self):
        return N

    def __getitem__(self, i):
        labels = self.ids[i].clone() if self.lm else self.y[i]
        if self.lm:
            labels[: i % 3] = -100  # some positions not counted
        return {"input_ids": self.ids[i], "labels": labels}


def bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=SEQ, num_labels=3)
    return BertForSequenceClassification(cfg)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def run(out_dir, sampler, *, model=bert, lm=False, workers=0, max_steps=40, save_steps=8, stop_at=None,
        resume=None, accumulation=1, batch_size=B, **training_args):
    """Train with sgdlab's Trainer; returns (indices per micro-batch, weights per micro-batch, final params)."""
    from transformers import TrainerCallback, TrainingArguments

    from sgdlab.integrations.transformers import INDEX_KEY, WEIGHT_KEY, Trainer

    seen, weights = [], []

    class Recording(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                seen.append(inputs[INDEX_KEY].tolist())
                weights.append(inputs[WEIGHT_KEY].tolist())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if stop_at is not None and state.global_step == stop_at:
                control.should_training_stop = True

    args = TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=batch_size, max_steps=max_steps,
                             save_steps=save_steps, learning_rate=0.05, report_to="none", logging_steps=1000,
                             dataloader_num_workers=workers, gradient_accumulation_steps=accumulation,
                             use_cpu=True, seed=0, disable_tqdm=True, save_only_model=False, **training_args)
    trainer = Recording(model=model(), args=args, train_dataset=TokenData(lm), sampler=sampler,
                        callbacks=[Stop()])
    trainer.train(resume_from_checkpoint=resume)
    params = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return seen, weights, params, trainer


def same_params(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def checkpoint(out_dir, step):
    return os.path.join(str(out_dir), f"checkpoint-{step}")
