"""edgemed's built-in calibration and parity material: prompts, reference-style turns and a
deterministic radiograph-like image, used when a recipe names no calibration set. One home for
every built-in list; their contents are what the shipped artifacts were calibrated and checked on,
so changing one changes artifacts."""
from __future__ import annotations

import numpy as np

# The prompts parity checks every artifact on (with the image on even prompts).
PARITY_PROMPTS = (
    "Is there a pleural effusion on this chest radiograph?",
    "Describe the findings in the left lower lobe.",
)


def synthetic_test_image(size: int = 96, seed: int = 0) -> "Image.Image":  # noqa: F821
    """A deterministic radiograph-like picture (dark field, bright ellipses, noise) for parity."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 40 + 60 * np.exp(-((xx - 0.3) ** 2 / 0.02 + (yy - 0.5) ** 2 / 0.08))
    img += 60 * np.exp(-((xx - 0.7) ** 2 / 0.02 + (yy - 0.5) ** 2 / 0.08))
    img += 20 * np.sin(yy * 40) + rng.normal(0, 6, img.shape)
    gray = np.clip(img, 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([gray] * 3, -1))


# Calibration turns (question + a reference-style answer), used when a recipe names no set.
BUILTIN_TURNS = (
    ("Is there a pleural effusion on this chest radiograph?", "Yes, there is a small right pleural effusion blunting the costophrenic angle."),
    ("Describe the findings in the left lower lobe.", "There is patchy consolidation in the left lower lobe consistent with pneumonia."),
    ("Is the cardiac silhouette enlarged?", "The cardiothoracic ratio is above 0.5, suggesting cardiomegaly."),
    ("Is there a pneumothorax?", "No pneumothorax is seen; the lung markings extend to the chest wall."),
    ("What imaging modality is this?", "This is a frontal chest x-ray in the posteroanterior projection."),
    ("Are there any nodules or masses?", "A well-circumscribed 2 cm nodule is present in the right upper lobe."),
    ("Which organ shows an abnormality?", "The liver shows a hypodense lesion in segment seven."),
    ("Is this MRI of the brain normal?", "There is a hyperintense lesion in the left temporal lobe on T2-weighted images."),
)


# The prompts TensorRT's Q/DQ calibration runs (half with an image).
QDQ_CALIBRATION_PROMPTS = (
    "Is there a pleural effusion on this chest radiograph?",
    "Describe the cardiac silhouette.",
    "Is the endotracheal tube in a correct position?",
    "What abnormality is seen in the right upper lobe?",
    "Are there signs of pneumothorax?",
    "Summarize the findings of this image.",
)
