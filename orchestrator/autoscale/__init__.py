"""Online P:D autoscaling: signals (live load), policy (pure), capacity (cost model), loop (the task)."""
