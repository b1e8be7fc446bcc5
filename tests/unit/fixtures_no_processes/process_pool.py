# expect: concurrent.futures.ProcessPoolExecutor
from concurrent.futures import ProcessPoolExecutor

ProcessPoolExecutor().shutdown()
