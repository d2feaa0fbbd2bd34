"""Nesting three levels deep: main -> middle -> leaf."""

import flyte

env = flyte.TaskEnvironment(name="nested")


@env.task
async def leaf(x: int) -> int:
    return x + 1


@env.task
async def middle(x: int) -> int:
    return await leaf(x) * 10


@env.task
async def main(x: int) -> int:
    return await middle(x) + 5
