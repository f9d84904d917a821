"""Weights below the models: reading weight files safely and loading them strictly into a network.

    io.py      read_state_dict / read_shapes (safetensors; `.ckpt` pickles with weights_only), file hashes
    strict.py  instantiate(factory, state_dict): built on `meta`, every key and shape checked, then assigned

`models/` (the frozen MiniLM loads its package's weights), `components.py` and the checkpoint formats of
`checkpoints/` all load through here; this package imports no network, so none of them import upwards.
"""
