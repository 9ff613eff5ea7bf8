"""Emulated workload managers (PBS, LSF, Flux): test equipment that follows the manuals."""
