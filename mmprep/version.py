"""mmprep's version: a foundation module (imports nothing), read by the package, the CLI, shard and index
metadata, the HTTP user agent, and pyproject.toml (`[tool.setuptools.dynamic]`)."""

__version__ = "0.1.0"
