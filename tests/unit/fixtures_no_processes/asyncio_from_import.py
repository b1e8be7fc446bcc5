# expect: asyncio.create_subprocess_shell
from asyncio import create_subprocess_shell


async def main() -> None:
    await create_subprocess_shell("true")
