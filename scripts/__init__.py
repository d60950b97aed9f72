"""Entry points (train, evaluate, ...) as pure functions with thin Hydra/CLI wrappers.

Importing this package registers the OmegaConf resolvers the configs use.
"""
from omegaconf import OmegaConf

# ${div:a,b} = a // b, e.g. attention at half the image size: ${div:${datamodule.image_size},2}
OmegaConf.register_new_resolver("div", lambda a, b: int(a) // int(b), replace=True)
