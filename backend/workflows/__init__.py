"""The use cases every face calls (train a version, push predictions, warm start, cross-validation)."""
