"""Training: one loop (:mod:`~rqvae.train.trainer`) and one task object per thing we train.

- :mod:`~rqvae.train.task`: :class:`TrainerConfig` (the loop's options, shared by every training command)
  and :class:`TrainTask` (what a task supplies: data, models, ``train_step``, samples, the final save);
- :mod:`~rqvae.train.trainer`: :class:`Trainer` (accumulation, clipping, NaN guard, EMA, logs, samples,
  checkpoints and bitwise resume, DDP, ``stop_after``, Ctrl-C checkpoints);
- tasks: :mod:`~rqvae.train.vae` (stage 1, :func:`train_vae`), :mod:`~rqvae.train.ar` (stage 2,
  :func:`train_ar`; conditions and sample grids in :mod:`~rqvae.train.ar_cond`),
  :mod:`~rqvae.train.classifier` (the evaluation classifier, :func:`train_classifier`);
- pieces: :mod:`~rqvae.train.optim` (optimizers, LR schedule, clipping), :mod:`~rqvae.train.ema`,
  :mod:`~rqvae.train.guard` (non-finite steps), :mod:`~rqvae.train.precision` (bf16 autocast),
  :mod:`~rqvae.train.logger` (metrics.jsonl, TensorBoard, progress), :mod:`~rqvae.train.checkpoint`.

Each config dataclass is also the command line of its command (:mod:`rqvae.config`).
"""
