"""What a training run needs around its loop: options, optimizers, checkpoints and resume, the exported policy,
logs and the phase timer."""
