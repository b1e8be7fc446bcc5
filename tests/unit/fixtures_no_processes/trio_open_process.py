# expect: trio.lowlevel.open_process
import trio


async def main() -> None:
    await trio.lowlevel.open_process(["true"])
