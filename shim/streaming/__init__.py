"""The streaming server: exec, attach and port-forward over HTTP upgrades (SPDY/3.1, WebSocket)."""
