"""Machinery a fork rarely opens: crash-safe video files, the checkpoint folder, durable writes, the
run's lock, device and progress, the command lines' helpers, memory counting and the memory modes."""
