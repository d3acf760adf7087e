"""`mmprep export`: a cache's entries in the layouts other tools read.

One module per format: `npy` (clip-retrieval's img_emb/ + metadata/), `parquet` (one vector column).
`source` streams a model's entries out of the cache, `tabular` holds what the two row-aligned formats
share, `staging` publishes a finished directory whole. The vLLM encoder-cache store (`--format vllm-ec`)
is a serving format: `mmprep.serving.vllm_ec`, which builds on `source` and `progress`.
"""

from __future__ import annotations
