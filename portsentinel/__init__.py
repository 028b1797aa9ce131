"""portsentinel: port-scan detection and blocking, a drop-in successor of PortSentry 1.2."""

__version__ = "0.1.0"
