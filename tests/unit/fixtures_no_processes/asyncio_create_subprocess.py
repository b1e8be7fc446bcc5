# expect: asyncio.create_subprocess_exec
import asyncio


async def main() -> None:
    await asyncio.create_subprocess_exec("true")
