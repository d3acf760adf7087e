"""GLM-4.1V (and GLM-4.5V, the MoE variant with the same tower): merged tokens and `image_grid_thw`."""

from __future__ import annotations

from mmprep.models.grid import GridTowerEncoder


class Glm4vEncoder(GridTowerEncoder):
    """Per image: "embeddings" [n_tokens, out_hidden] (the tower's downsampled, merged tokens) and
    "image_grid_thw" [1, 3] int64."""

    family = "glm4v"
    VISION_TOWERS = {
        "Glm4vForConditionalGeneration": ("glm4v", "Glm4vVisionModel"),
        "Glm4vMoeForConditionalGeneration": ("glm4v_moe", "Glm4vMoeVisionModel"),
    }


ARCHITECTURES = tuple(Glm4vEncoder.VISION_TOWERS)
