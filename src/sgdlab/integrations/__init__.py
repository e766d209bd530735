"""Optional adapters for other training stacks; each submodule imports its framework when it is imported.

- :mod:`sgdlab.integrations.lightning` -- ``SamplerCheckpoint``, a Lightning callback that checkpoints a
  sampler at the last trained batch (exact with DataLoader workers) (``pip install 'sgdlab[lightning]'``),
  and ``MonitorCallback``, which runs :mod:`sgdlab.monitors` and logs to the trainer's loggers.
- :mod:`sgdlab.integrations.accelerate` -- ``prepare_loader``, a loader for Hugging Face Accelerate that
  keeps the sampler's own DDP slicing and resumes exactly through ``save_state``/``load_state``
  (``pip install 'sgdlab[accelerate]'``).
- :mod:`sgdlab.integrations.transformers` -- ``Trainer``, Hugging Face's ``Trainer`` training with any sgdlab
  sampler (blind or score-driven), resumed exactly from its own checkpoints (``pip install 'sgdlab[transformers]'``).
- :mod:`sgdlab.integrations.monitors_hf` -- ``MonitorCallback``, a ``transformers.TrainerCallback`` that runs
  :mod:`sgdlab.monitors` on a probe batch and logs through ``Trainer.log``.

Nothing else in sgdlab imports this package.  The recipes are in docs/frameworks.md.
"""

__all__: list[str] = []
