"""cellos-producer: CellOS guest telemetry and host probes as signed, chained CloudEvents."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cellos-producer")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
