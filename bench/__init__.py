"""Measurement tools, run from the repository root: python bench/benchmark.py, bash bench/gpu.sh,
python bench/hash_checkpoint.py, python bench/count_params.py, python bench/context_parallel_memory.py."""
