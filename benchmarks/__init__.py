"""cast-train: benchmarks."""
