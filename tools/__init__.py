"""Commands run now and then: the benchmark and data preparation (`python tools/bench.py`, `python tools/prepare_data.py`)."""
