"""Train (or load) the cached ``classifier`` feature extractor of a dataset and print its accuracy.

    python scripts/train_classifier.py datamodule=digits
    python scripts/train_classifier.py datamodule=mnist paths.cache_dir=/shared/cache
"""
from __future__ import annotations

import json

import hydra

import models.configs  # noqa: F401  (registers the config resolvers)
from omegaconf import DictConfig

from metrics.classifier import load_or_train_feature_classifier


def feature_classifier_job(cfg: DictConfig) -> dict:
    datamodule = hydra.utils.instantiate(cfg.datamodule)
    extractor = load_or_train_feature_classifier(datamodule, cfg.paths.cache_dir, seed=int(cfg.seed))
    return {"dataset": datamodule.name, "cache_key": extractor.key, "test_accuracy": extractor.test_accuracy}


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    print(json.dumps(feature_classifier_job(cfg)))


if __name__ == "__main__":
    main()
