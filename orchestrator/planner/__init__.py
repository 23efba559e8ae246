"""Tandem's planner: a cost model of DeepSeek-V4 (and V3.2) per GPU kind, a discrete-event fleet
simulator that drives the router's own `KvIndex` and policy objects, and P:D planning on top.

Torch-free: everything here is arithmetic on published hardware numbers and model configs.
"""
