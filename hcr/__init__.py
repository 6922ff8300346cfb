"""hcr: research tools for hidden capacity reasoning.

The research layer (data, models, training, generation, command line) on top of
the ops in ``hcr_kernels``. Run ``hcr demo`` for the environment report and a
short benchmark, ``hcr --help`` for the commands.
"""

__version__ = "0.1.0"
