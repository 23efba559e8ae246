"""Tandem's orchestrator: deployment spec, controller, router, HTTP API, planner, CLI."""
