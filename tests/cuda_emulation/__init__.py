"""A CPU build of fastseg's CUDA sources for the tests: see cuda_emulation.h and build.py."""
