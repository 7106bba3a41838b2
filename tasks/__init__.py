"""Where episodes come from: what a task is, seed-addressed episode ids, task families."""
