"""Private implementation modules of rbyz: kernels and helpers with no stable API."""
