"""Code that runs inside vLLM's own worker processes (loaded through `worker_extension_cls`).

extension.py is the class vLLM mixes into its GPU/CPU worker; receive.py takes weight buckets in from CUDA IPC
handles and shared memory; devices.py names devices the way trainers, workers and engine ranks all do (the
trainer side imports it). Nothing in this package may import the broker or the client.
"""
