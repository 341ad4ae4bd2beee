"""edgeinferd: the inference daemon (needs torch; install ``edgeinfer[daemon]``)."""

__version__ = "0.1.0"
