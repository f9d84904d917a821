"""`daguerre explain`: figures that show how latent diffusion works, on any model (issue 22, docs/explain.md).

One module per sub-command (`noising`, `schedules`, `trajectory`, `attention`, `autoencoder`, `samplers`), each
with `add_arguments(parser)` and `run(args) -> list[Figure]` for the command line and plain functions beneath
it (the Python API); `page.py` holds `Figure` and `write_page`, the one self-contained HTML page.
"""
