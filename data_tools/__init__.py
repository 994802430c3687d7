"""cast-train: data_tools."""
