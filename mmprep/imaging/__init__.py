"""Images, from untrusted bytes to a model's pixel values: below the models, above the foundation.

`decode` turns bytes into an RGB image (format sniffed, limits checked from the header, the decode
profiles that copy a server's loader); `fastprep` is the exact fast preprocessing of transformers'
PIL-backend processors; `resample` is Pillow's resize computed only for the kept window, natively
by `_resample.c` when built. Nothing here imports `mmprep.models`.
"""
