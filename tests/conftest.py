"""Settings for the whole suite.

One torch thread: the models here are tiny, and on a small CPU two threads that wait on each other run
them several times slower (quantised kernels up to 20x). Subprocess runs set OMP_NUM_THREADS themselves.
"""

import torch

torch.set_num_threads(1)
