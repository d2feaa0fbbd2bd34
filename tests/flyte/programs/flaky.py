"""A task that fails recoverably on its first attempt and succeeds on the second."""

import pathlib

import flyte

env = flyte.TaskEnvironment(name="flaky")


@env.task(retries=1)
async def main(marker: str) -> str:
    path = pathlib.Path(marker)
    if not path.exists():
        path.write_text("failed once")
        raise RuntimeError("first attempt fails")
    return "second attempt succeeded"
