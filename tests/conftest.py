"""One CPU thread for every test and the processes tests start: the models are tiny, and on a busy
machine a second OpenMP thread that waits for a core makes each step many times slower. And the
tiny checkpoint that the tests of endless generation share."""

import os

import pytest
import torch

from pipeline import StableDiffusionXLVideoPipeline
from tiny_pipeline import tiny_video_pipeline

os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A checkpoint folder of tiny random weights everywhere, temporal modules included (so the
    context matters), written once per test module."""
    folder = tmp_path_factory.mktemp("model")
    tiny_video_pipeline(tmp_path_factory.mktemp("tokenizer")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipeline(model):
    """`model`, loaded."""
    return StableDiffusionXLVideoPipeline.from_pretrained(model)
