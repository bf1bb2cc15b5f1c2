"""udpmux: carry UDP and TCP flows through NAT, firewalls and lossy links."""

__version__ = "0.1.0"
