# expect: multiprocessing.pool
"""A submodule of a banned package."""

import multiprocessing.pool

multiprocessing.pool.Pool(2)
