"""A failing child: the root fails with the child's own message."""

import flyte

env = flyte.TaskEnvironment(name="failing")


@env.task
async def broken(x: int) -> int:
    raise ValueError(f"the child refuses {x}")


@env.task
async def main(x: int) -> int:
    return await broken(x)
