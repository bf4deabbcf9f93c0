"""LightningModules: Gaussian splatting and Lorentz (hyperbolic) networks."""
