"""Shared pytest setup: the project's modules live flat in the repository root, and no test may
reach the network (an accidental download must fail loudly, not hang)."""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
