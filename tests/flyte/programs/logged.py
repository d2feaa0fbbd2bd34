"""A program that prints: `flyte run --follow` shows these lines."""

import asyncio

import flyte

env = flyte.TaskEnvironment(name="logged")


@env.task
async def square(i: int) -> int:
    print(f"square of {i} is {i * i}", flush=True)
    return i * i


@env.task
async def main(n: int) -> int:
    print(f"fanning out over {n} children", flush=True)
    total = sum(await asyncio.gather(*(square(i) for i in range(n))))
    print(f"the total is {total}", flush=True)
    return total
