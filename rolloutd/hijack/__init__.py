"""Code that runs inside vLLM's own worker processes (loaded through `worker_extension_cls`).

extension.py is the class vLLM mixes into its GPU/CPU worker; weight loading from CUDA IPC handles and
shared memory lands here next. Nothing in this package may import the broker or the client.
"""
