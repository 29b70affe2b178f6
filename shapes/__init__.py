"""The shapes world of the embedded baby model and its yardstick: clips, the detector, survival curves."""
