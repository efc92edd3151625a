"""The Accelerate program: entry point, typed config, models, loops, checkpoints, evaluation."""
