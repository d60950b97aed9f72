"""Feature extractors, feature-space metrics, the evaluation callback and results files."""
