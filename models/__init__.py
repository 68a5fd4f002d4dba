"""The video generators: the backbone table and the shared plumbing (backbones.py), one module per family with
the same functions (hunyuan.py: HunyuanVideo-1.5, wan.py: Wan2.1)."""
