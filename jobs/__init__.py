"""cast-train: jobs."""
