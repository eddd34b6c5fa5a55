"""Training a model: the loop (loop.train), its learning-rate horizon, what several processes agree on,
resuming, checkpoints, batches, the run folder and what is written into it, compare-timesteps' runs."""
