"""A @flyte.trace and a flyte.io.File passed from one task to another."""

import flyte
from flyte.io import File

env = flyte.TaskEnvironment(name="files")


@flyte.trace
async def double(x: int) -> int:
    return x * 2


@env.task
async def write(text: str) -> File:
    f = File.new_remote()
    async with f.open("wb") as fh:
        await fh.write(text.encode())
    return f


@env.task
async def read(f: File) -> str:
    async with f.open("rb") as fh:
        return bytes(await fh.read()).decode()


@env.task
async def main(x: int) -> str:
    doubled = await double(x)
    f = await write(f"value {doubled}")
    return await read(f)
