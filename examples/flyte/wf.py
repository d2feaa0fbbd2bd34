"""A fan-out: main(n) squares 0..n-1 in parallel child actions and sums them.

    flyte --endpoint dns:///127.0.0.1:8091 --insecure run \
        --project flytesnacks --domain development --follow examples/flyte/wf.py main --n 10
"""

import asyncio

import flyte

env = flyte.TaskEnvironment(name="wf")


@env.task
async def square(i: int) -> int:
    print(f"square({i}) = {i * i}", flush=True)
    return i * i


@env.task
async def main(n: int) -> int:
    print(f"fanning out over {n} children", flush=True)
    total = sum(await asyncio.gather(*(square(i) for i in range(n))))
    print(f"the total is {total}", flush=True)
    return total
