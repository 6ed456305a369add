"""Coverage-guided fuzzing of the protocol cores, the device and the control socket (see fuzz/run.py)."""
