"""Evaluation metrics (FID, KID, Inception Score) computed from extracted features."""

from daguerre.metrics.stats import feature_statistics, frechet_distance, inception_score, kernel_inception_distance

__all__ = ["feature_statistics", "frechet_distance", "kernel_inception_distance", "inception_score"]
