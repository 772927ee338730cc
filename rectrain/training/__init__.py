"""The device side of a run and its state, from a uint8 batch to an optimizer step:

``step`` (``DeviceNormalize``, then ``TrainStep``: augment, forward, loss, backward, optimizer) built from ``parts``
(model, optimizer, scaler, autocast: one way for every caller; ``optim``: LARS and LAMB) with ``augment`` (MixUp,
CutMix, Random Erasing, Cutout on whole batches), ``losses`` and ``schedule`` (the learning rate and resolution as
pure functions); ``loop`` (the epoch loop: timing, data wait, the non-finite guard, the stop flag; ``TrainState``);
``evaluation`` (validation passes); ``ema`` (weight averaging); ``warmup`` (every batch shape once before epoch 1);
``checkpoint`` (the file format, atomic saves, loading).
"""
