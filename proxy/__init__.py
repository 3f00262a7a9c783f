"""incountry-proxy: an authenticating reverse proxy for InCountry's REST API."""

__version__ = "0.1.0"
