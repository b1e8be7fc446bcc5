"""qwen-serve: a Trio daemon that brokers OAuth 2.0 device logins (RFC 8628) for remote clients."""

__version__ = "0.1.0"
