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


# Sequence-level distillation (distill `data: parent`): the parent writes its own answers to
# task x topic prompts; recovery trains on them. Held-out topics never reach training: the
# distill step's KLD-vs-steps curve is measured on the parent's answers to those.
DISTILL_TASKS = (
    "Explain {t} to a medical student.",
    "What are the typical imaging findings of {t}?",
    "Write the impression section of a radiology report for a patient with {t}.",
    "List the differential diagnosis to consider for {t}.",
    "How is {t} usually treated?",
    "Summarize the key facts about {t} in three sentences.",
    "What complications can follow {t}?",
    "Write a patient-friendly explanation of {t}.",
    "Which questions should a clinician ask a patient with suspected {t}?",
    "Which laboratory tests and imaging help to diagnose {t}?",
    "Describe the anatomy and physiology behind {t}.",
    "Write a short case vignette of a patient with {t}.",
)
DISTILL_TOPICS = (
    "pneumonia", "pleural effusion", "pneumothorax", "cardiomegaly", "pulmonary embolism", "a solitary lung nodule",
    "tuberculosis", "COPD", "asthma", "congestive heart failure", "atelectasis", "rib fractures", "aortic dissection",
    "appendicitis", "kidney stones", "ischemic stroke", "glioblastoma", "multiple sclerosis",
    "osteoarthritis of the knee", "osteoporosis", "breast cancer screening", "type 2 diabetes", "hypertension", "sepsis", "liver cirrhosis",
    "acute pancreatitis", "COVID-19 pneumonia", "sarcoidosis", "pulmonary fibrosis", "small bowel obstruction",
    "photosynthesis", "the water cycle", "how a bicycle works", "baking bread", "the phases of the moon",
    "volcanoes", "a train journey through the mountains", "how vaccines were discovered",
)
DISTILL_HELDOUT_TOPICS = (
    "hip fracture", "bacterial meningitis", "deep vein thrombosis", "infective endocarditis", "thyroid nodules",
    "a lighthouse keeper's day", "ocean tides",
)
