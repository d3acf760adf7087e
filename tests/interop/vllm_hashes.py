"""Run by the vLLM venv's python: vLLM's own identifier for each image file, per (model id, algorithm).

The path a chat request's image_url takes: `ImageMediaIO().load_bytes` (what MediaConnector calls for
http and data URLs) -> `ImageProcessorItems` -> `ProcessorInputs.get_mm_hashes(model_id, algorithm)`.
Usage: python vllm_hashes.py SPEC.json, SPEC = {"cases": [[model_id, algorithm], ...], "files": [...]};
prints {"vllm": version, "hashes": [[hash of each file] per case]}.
"""

import json
import sys
from pathlib import Path

import vllm
from vllm.multimodal.media.image import ImageMediaIO
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing.inputs import ProcessorInputs

spec = json.loads(Path(sys.argv[1]).read_text())
images = [ImageMediaIO().load_bytes(Path(f).read_bytes()) for f in spec["files"]]
inputs = ProcessorInputs(prompt=[], mm_data_items=MultiModalDataItems({"image": ImageProcessorItems(images)}))
hashes = [inputs.get_mm_hashes(model_id, algorithm)["image"] for model_id, algorithm in spec["cases"]]
print(json.dumps({"vllm": vllm.__version__, "hashes": hashes}))
