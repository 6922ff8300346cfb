"""``hcr demo``: a whole hidden-capacity experiment, offline (see ``hcr.demo.experiment``)."""

from hcr.demo.command import add_arguments, main

__all__ = ["add_arguments", "main"]
