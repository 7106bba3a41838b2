"""The run: config, central learner, worker actors, checkpoints, tracking and the CLI."""
