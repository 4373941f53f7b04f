"""Training: the objectives, the data pipeline, the recipes (what each stage trains on) and the
trainer."""
