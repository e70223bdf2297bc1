"""The streaming server: Exec, Attach and PortForward hand out a URL here, and
clients (crictl, kubelet's proxy for kubectl) connect to it over SPDY/3.1 or
WebSocket to talk to a process in a container or to a port in a pod."""
