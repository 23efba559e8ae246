"""Expert parallelism: an EP group of N ranks, token dispatch / combine, and the EP model runner.

group.py     the process group (gloo on CPU, NCCL on GPU) and the expert ownership map
dispatch.py  the exchange interface and its two paths: variable all-to-all, padded fixed capacity
moe.py       the MoE layer under EP: gate locally, dispatch to owners, run, combine in order
runner.py    the ModelRunner of one EP rank, and lockstep (idle ranks run empty batches)
"""
