"""mage_cl: the slim Continual-NExT continual-learning driver built on mage_kernels."""

__version__ = "0.1.0"
