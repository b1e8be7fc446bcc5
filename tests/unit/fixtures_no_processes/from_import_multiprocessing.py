# expect: multiprocessing.Process
from multiprocessing import Process

Process(target=print).start()
