# expect: trio.lowlevel.open_process
from trio import lowlevel


async def main() -> None:
    await lowlevel.open_process(["true"])
