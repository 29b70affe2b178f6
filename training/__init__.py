"""train.py's parts: the loop and its checkpoints, the data, validation, self-generated context, the memory plan."""
