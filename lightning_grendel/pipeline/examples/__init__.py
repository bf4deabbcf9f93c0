"""Example pipelined LightningModules used by the recipes: a tiny language model and a Lorentz classifier."""
