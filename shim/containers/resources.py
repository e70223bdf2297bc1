"""OCI `linux.resources` from CRI LinuxContainerResources (containerd's WithResources),
for CreateContainer and UpdateContainerResources alike.

Device rules are not part of this: they belong to the container's creation only (an
update that carried a deny-all rule to `runtime update` would take a running
container's devices away)."""

from __future__ import annotations

from typing import Any

from shim._proto import api_pb2


def linux_resources(
    res: api_pb2.LinuxContainerResources,
    *,
    controllers: frozenset[str],
    swap_accounting: bool,
    cgroup_v2: bool,
) -> dict[str, Any]:
    """Only what the request sets (0 and "" mean unset in the CRI) and the node has a
    controller for: cpu (shares, quota, period), cpuset (cpus, mems), memory (limit;
    swap only with swap accounting, equal to the limit when no swap limit is asked, so
    that a limited container does not swap), hugetlb (per page size), and the `unified`
    keys on cgroup v2 only (v1 has no such files). Values were checked by validation."""
    out: dict[str, Any] = {}
    cpu: dict[str, Any] = {}
    if "cpu" in controllers:
        if res.cpu_shares:
            cpu["shares"] = res.cpu_shares
        if res.cpu_quota:
            cpu["quota"] = res.cpu_quota
        if res.cpu_period:
            cpu["period"] = res.cpu_period
    if "cpuset" in controllers:
        if res.cpuset_cpus:
            cpu["cpus"] = res.cpuset_cpus
        if res.cpuset_mems:
            cpu["mems"] = res.cpuset_mems
    if cpu:
        out["cpu"] = cpu
    if "memory" in controllers:
        memory: dict[str, Any] = {}
        if res.memory_limit_in_bytes:
            memory["limit"] = res.memory_limit_in_bytes
            if swap_accounting:
                memory["swap"] = res.memory_limit_in_bytes
        if res.memory_swap_limit_in_bytes and swap_accounting:
            memory["swap"] = res.memory_swap_limit_in_bytes
        if memory:
            out["memory"] = memory
    if "hugetlb" in controllers and res.hugepage_limits:
        out["hugepageLimits"] = [{"pageSize": h.page_size, "limit": h.limit} for h in res.hugepage_limits]
    if cgroup_v2 and res.unified:
        out["unified"] = dict(sorted(res.unified.items()))
    return out
