"""Data modules for the Lorentz networks: WN18RR triples, Planetoid graphs, synthetic sequence tasks."""
