"""Long-running tasks: a timeout, and a run to abort."""

import asyncio
import os
import pathlib

import flyte

env = flyte.TaskEnvironment(name="slow")


@env.task(timeout=2)
async def too_slow(x: int) -> int:
    await asyncio.sleep(60)
    return x


async def _record(pids: str) -> None:
    directory = pathlib.Path(pids)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / str(os.getpid())).write_text("")


@env.task
async def sleeper(pids: str, i: int) -> int:
    await _record(pids)
    await asyncio.sleep(60)
    return i


@env.task
async def sleepy_parent(pids: str, n: int) -> int:
    await _record(pids)
    return sum(await asyncio.gather(*(sleeper(pids, i) for i in range(n))))


@env.task
async def pause(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@env.task
async def survivor(n: int, seconds: float) -> float:
    return sum(await asyncio.gather(*(pause(seconds) for _ in range(n))))
