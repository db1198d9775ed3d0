"""deploy: the `twin` CLI, model registry operations, scheduled retraining."""
