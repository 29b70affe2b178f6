"""One CPU thread for every test and the processes tests start: the models are tiny, and on a busy
machine a second OpenMP thread that waits for a core makes each step many times slower."""

import os

import torch

os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
