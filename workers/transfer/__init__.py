"""KV handoff over NIXL: agents, layout pairing, descriptor lists, leases, the decode-side pull."""
