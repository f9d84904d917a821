"""Evaluation (docs/evaluation.md): statistics, the classifiers daguerre trains as judges and feature
extractors, user-supplied Inception-v3, and `daguerre eval`.

    stats.py             Frechet distance, KID, Inception Score (numpy, float64)
    classifiers.py       the shapes attribute classifier and the Fashion-MNIST classifier
    train_classifier.py  `daguerre classifier train|test`
    extractors.py        the FeatureExtractor protocol and `load_extractor`
    inception.py         Inception-v3 (torchvision or pytorch-fid FID weights) from a file
    evaluate.py          `daguerre eval`: prompts, generation, adherence, FD/KID/IS, report and grid
"""

from daguerre.metrics.stats import feature_statistics, frechet_distance, inception_score, kernel_inception_distance

__all__ = ["feature_statistics", "frechet_distance", "kernel_inception_distance", "inception_score"]
