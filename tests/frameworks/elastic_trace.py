"""Test plugin (config ``imports: [elastic_trace]``): records every keyed draw the engine makes.

With ``SGDLAB_TRACE_DIR`` set, each process appends to ``trace-rank{RANK}-{pid}.jsonl`` one line per
Shake-Shake call, per Random Gradient call and per augmentation (the augmented images' sums): the step, the batch's global example indices (from the
active keyed context) and the coefficients or factors drawn for them.
"""

import importlib
import json
import os
from pathlib import Path

from sgdlab import keyed

shake = importlib.import_module("sgdlab.regularize.shake")  # the module (sgdlab.regularize.shake is the function)
random_gradient = importlib.import_module("sgdlab.regularize.random_gradient")

OUT = os.environ.get("SGDLAB_TRACE_DIR")

if OUT and not getattr(shake, "_traced", False):
    shake._traced = True
    PATH = Path(OUT) / f"trace-rank{int(os.environ.get('RANK', '0'))}-{os.getpid()}.jsonl"

    def _record(kind, keys=None, **values):
        keys = keys or keyed.current()
        row = {"kind": kind, "step": keys.step, "indices": keys.indices.tolist(),
               **{k: v.detach().flatten().tolist() for k, v in values.items()}}
        with PATH.open("a") as f:
            f.write(json.dumps(row) + "\n")

    _draw = shake.draw_coefficients

    def draw_coefficients(like, **kw):
        a, b = _draw(like, **kw)
        _record("shake", a=a, b=b)
        return a, b

    shake.draw_coefficients = draw_coefficients
    _call = random_gradient.RandomGradient.__call__

    def __call__(self, losses, **kw):
        out = _call(self, losses, **kw)
        _record("rg", factor=self.last_factor)
        return out

    random_gradient.RandomGradient.__call__ = __call__

    from sgdlab.train import engine

    _augment = engine.cifar_augment

    def cifar_augment(x, **kw):
        out = _augment(x, **kw)
        _record("augment", kw.get("keys"), sums=out.flatten(1).sum(1))
        return out

    engine.cifar_augment = cifar_augment

    from sgdlab.sampling import importance

    _next = importance.ImportanceSampler.next_batch

    def next_batch(self):
        batch = _next(self)
        row = {"kind": "batch", "step": self.steps - 1, "indices": batch.indices.tolist(),
               "weights": [] if batch.weights is None else batch.weights.tolist()}
        with PATH.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return batch

    importance.ImportanceSampler.next_batch = next_batch
