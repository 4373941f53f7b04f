"""Tasks: raw records, loaders, task formats and metrics."""
