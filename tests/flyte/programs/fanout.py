"""Fan-out: main(n) sums square(i) over n children."""

import asyncio

import flyte

env = flyte.TaskEnvironment(name="fanout")


@env.task
async def square(i: int) -> int:
    return i * i


@env.task
async def main(n: int) -> int:
    return sum(await asyncio.gather(*(square(i) for i in range(n))))
