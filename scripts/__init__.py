"""Entry points (train, evaluate, ...) as pure functions with thin Hydra/CLI wrappers.

Composing a config from Python: models.configs.compose (it registers the resolvers).
"""
