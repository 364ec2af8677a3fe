"""Assets: models and datasets fetched into the local cache, and loading models from it."""
