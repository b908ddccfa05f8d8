"""rpt_jax: Reinforcement Pre-Training (arXiv 2506.08007) in JAX.

Data flows one way: corpora -> contexts -> sampling -> reward -> objective -> train_step;
`trainer` wires them together. Start reading at README.md's map.
"""
__version__ = "0.1.0"
