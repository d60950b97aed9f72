"""Entry points (train, evaluate, ...) as pure functions with thin Hydra/CLI wrappers."""
