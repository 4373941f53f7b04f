"""Training: objectives now; data pipeline and loops land with the training issue."""
