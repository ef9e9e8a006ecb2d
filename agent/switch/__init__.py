"""Traffic switches run at takeover: DNS (RFC 2136, Route 53) and hooks (exec, webhook)."""
