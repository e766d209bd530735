"""sgdlab's transformers Trainer at another world size: a checkpoint of one number of processes resumed by another.

Usage: [torchrun --nproc_per_node=P] hf_elastic.py OUT_DIR NAME STEPS [CHECKPOINT].  Trains to STEPS with global
batch 4 (SRS, per-device batch 4 / P), saving checkpoint-8 in OUT_DIR/NAME (and stopping at step 8 when STEPS is
8), or resumes from CHECKPOINT.  Each rank writes OUT_DIR/NAME-rank{r}.json (its dataset indices per step); rank 0
writes OUT_DIR/NAME.pt (final weights).
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _hf_tiny import N, run  # noqa: E402

from sgdlab.sampling import SequencedReplacementSampler, rank_batch_size  # noqa: E402

OUT, NAME, STEPS = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
RESUME = sys.argv[4] if len(sys.argv) > 4 else None
GLOBAL = 4


def bert_without_dropout():
    """The tiny BERT without dropout: dropout masks come from torch's per-process generator, which does not
    carry over to another world size (docs/engine.md, "Elastic runs")."""
    from transformers import BertConfig, BertForSequenceClassification

    from _hf_tiny import SEQ, VOCAB

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=SEQ, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def factory(trainer):
    return SequencedReplacementSampler(N, rank_batch_size(GLOBAL, trainer.args.world_size), seed=3)


seen, _, params, trainer = run(OUT / NAME, factory, model=bert_without_dropout, workers=0, max_steps=16, save_steps=8,
                               stop_at=8 if STEPS == 8 else None, resume=RESUME,
                               batch_size=rank_batch_size(GLOBAL, int(os.environ.get("WORLD_SIZE", "1"))),
                               # Trainer's default multiplies the loss by the number of processes for models that
                               # take loss keywords (it expects a sum over the global tokens); this BERT's loss is
                               # a mean, so with gradient clipping the default would train differently per world size
                               average_tokens_across_devices=False,
                               # SGD: Adam divides by the root of tiny second moments, so gradients equal up to
                               # the reduction order (1e-9) could give updates that differ by the learning rate
                               optim="sgd")
r = trainer.args.process_index
(OUT / f"{NAME}-rank{r}.json").write_text(json.dumps([[i, s] for i, s in enumerate(seen)]))
if r == 0:
    torch.save(params, OUT / f"{NAME}.pt")
