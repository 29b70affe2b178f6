"""Machinery a fork rarely opens: crash-safe video files, memory counting and the memory modes."""
