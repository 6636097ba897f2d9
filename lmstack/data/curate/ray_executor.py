"""Run pipeline tasks on a Ray cluster (or a local Ray instance): same task functions, same markers.

Ray only schedules; each task reads its input and writes its outputs and completion marker to the
shared output directory, exactly as under the local process pool, so a rerun on either executor skips
finished shards. The output directory must be visible to every node (NFS, a mounted bucket).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from lmstack.errors import LmstackError


def map_tasks_on_ray(
    fn: Callable[..., Any], context: Any, tasks: list[Any], address: str, workers: int, desc: str
) -> list[Any]:
    """`[fn(context, task) for task in tasks]` as Ray tasks, one CPU each, results in task order."""
    try:
        import ray
    except ImportError:
        raise LmstackError("executor.kind ray needs Ray; pip install ray (or use executor.kind local)") from None
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers or None, include_dashboard=False, log_to_driver=False)
    remote_fn = ray.remote(num_cpus=1)(fn)
    context_ref = ray.put(context)
    pending = {remote_fn.remote(context_ref, task): i for i, task in enumerate(tasks)}
    results: list[Any] = [None] * len(tasks)
    with tqdm(total=len(tasks), desc=desc, unit="shard", file=sys.stderr) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                results[pending.pop(ref)] = ray.get(ref)
                bar.update(1)
    return results
