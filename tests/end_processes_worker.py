"""Run as 2 gloo processes (`torchrun --standalone --nproc_per_node 2`): does `end_processes` keep a collective that
was still in flight at its barrier from being freed by a gloo worker thread?

Rank 1 joins the all-gather a second late, so rank 0's is still waiting when rank 0 issues the barrier. Rank 0 drops
every reference of its own to the all-gather's output, ends the processes, and prints whether the output still lives:
it must, held by the barrier work that `end_processes` keeps. Freed, it would have been freed by whichever thread
released that work last, possibly a gloo worker after the interpreter began finalizing: the abort this prevents.
"""

import gc
import time
import weakref

import torch
import torch.distributed as dist

from rlhf_kit.training.distributed import end_processes

dist.init_process_group("gloo")
rank = dist.get_rank()
if rank == 1:
    time.sleep(1.0)
outputs = [torch.empty(2) for _ in range(2)]
handle = dist.all_gather(outputs, torch.full((2,), float(rank)), async_op=True)
output = weakref.ref(outputs[0])
del outputs, handle
end_processes()
time.sleep(0.5)  # time for the worker threads to release whatever they still hold
gc.collect()
print(f"rank {rank}: in-flight output alive after end_processes: {output() is not None}", flush=True)
