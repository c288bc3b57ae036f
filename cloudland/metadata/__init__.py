"""Instance metadata: the documents the metadata service and the config drive serve."""
