"""What defines a run and its files, shared by training, evaluation and the planner:
model and state construction, the optimizer, checkpoints and the parameters read from them."""
