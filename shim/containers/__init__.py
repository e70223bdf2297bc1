"""Containers: the lifecycle (CreateContainer ... RemoveContainer) on an OCI
runtime (runc or crun) and conmon, joining the namespaces their pod's pause pins."""
