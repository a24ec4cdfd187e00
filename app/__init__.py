"""tokenlean's HTTP service (FastAPI) and command line."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tokenlean")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
