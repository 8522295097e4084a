"""The stages of a fit, each with one job; :mod:`alphanet_ext.fit` runs them in order.

- :mod:`.statistics`: class means, splits and neighbours (one pass over the features)
- :mod:`.sampler`: the rows of each epoch (every few row, plus rho-balanced base rows)
- :mod:`.cache`: logits of the few-split and val rows, and of each chunk of an epoch,
  within a memory budget
- :mod:`.step`: the coefficient networks, AdamW, the training step (CUDA-graph replay)
- :mod:`.selection`: val scoring, epoch and trial choice
- :mod:`.checkpoint`: the state at the end of an epoch, written atomically, and resume
- :mod:`.progress`: progress bars
"""
