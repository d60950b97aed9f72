"""Entry points (train, evaluate, ...) as pure functions with thin Hydra/CLI wrappers.

Importing this package registers the OmegaConf resolvers the configs use.
"""
from omegaconf import OmegaConf

# ${div:a,b} = a // b, e.g. attention at half the image size: ${div:${datamodule.image_size},2}
OmegaConf.register_new_resolver("div", lambda a, b: int(a) // int(b), replace=True)
# ${for_seeds:items,seed,seeds} = items if seeds is null or seed in seeds, else [] (e.g. the costly
# Inception extractor on the final evaluation of seed 0 only, in one multirun over all seeds)
OmegaConf.register_new_resolver(
    "for_seeds", lambda items, seed, seeds: list(items) if seeds is None or int(seed) in list(seeds) else [],
    replace=True)
# ${positive:x} = x > 0, e.g. a null class exactly when labels are dropped: ${positive:${..label_dropout}}
OmegaConf.register_new_resolver("positive", lambda x: float(x) > 0, replace=True)
