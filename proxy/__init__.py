"""luxsci-proxy: a local authenticating reverse proxy for the LuxSci REST API."""

__version__ = "0.1.0"
