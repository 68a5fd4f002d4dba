"""The model-based reward judges behind rewards.py: VideoAlign (videoalign.py) and a Qwen2.5-VL judge
(vlm_judge.py)."""
