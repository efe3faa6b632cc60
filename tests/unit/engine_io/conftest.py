"""The engine's I/O tests run on both fast paths, as the engine's unit tests do."""

from fastpaths import fast_path  # noqa: F401  (an autouse fixture: every test, both paths)
