"""What the proxy tells operators: logs, the access line, metrics, the admin endpoint."""
