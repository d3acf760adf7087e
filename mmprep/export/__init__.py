"""`mmprep export`: a cache's entries in the layouts other tools read.

One module per format: `npy` (clip-retrieval's img_emb/ + metadata/), `parquet` (one vector column),
`vllm_ec` (vLLM's encoder-cache connector store). `source` streams a model's entries out of the cache,
`tabular` holds what the two row-aligned formats share, `staging` publishes a finished directory whole.
"""

from __future__ import annotations

from typing import Any

from mmprep.export.progress import ProgressReporter
from mmprep.settings import ExportSettings


def export_cache(settings: ExportSettings, reporter: ProgressReporter | None = None) -> Any:
    """Run one export; returns its report (TabularReport or EcReport)."""
    if settings.format == "vllm-ec":
        from mmprep.export.vllm_ec import export_vllm_ec

        return export_vllm_ec(settings, reporter)
    from mmprep.export.tabular import export_tabular

    return export_tabular(settings, reporter)
