"""The round engine: one loop for every driver (plain PyTorch, in-process Flower, the
Flower Simulation Engine, a deployment), with checkpoints after every round and resume."""
