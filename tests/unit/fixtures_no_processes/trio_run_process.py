# expect: trio.run_process
import trio


async def main() -> None:
    await trio.run_process(["true"])
