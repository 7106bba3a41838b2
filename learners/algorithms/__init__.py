"""One file per algorithm, each with its config variant, registered with ``learners.registry`` (found without a
list: every module here is imported on first use of the registry)."""
