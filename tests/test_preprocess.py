"""The runtime's numpy/Pillow preprocessing must reproduce the parent's Hugging Face processor."""
import numpy as np
import pytest
from PIL import Image

from edgemed.errors import BadInputError
from edgemed.models import load_model
from edgemed.runtime.preprocess import preprocess


@pytest.mark.parametrize("family", ["llava-siglip", "llava-clip"])
@pytest.mark.parametrize("size", [(96, 96), (120, 80), (57, 131)])
def test_matches_hf_image_processor(tiny_dir, family, size):
    cm = load_model(str(tiny_dir(family)))
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ref = cm.processor.image_processor(images=img, return_tensors="np")["pixel_values"]
    got = preprocess(img, cm.image.to_dict())
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_absurd_sizes_refused():
    facts = {"image_size": 32, "resize_mode": "squash", "resample": "bicubic", "rescale_factor": 1 / 255,
             "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    with pytest.raises(BadInputError, match="1x1"):
        preprocess(Image.new("RGB", (1, 1)), facts)
    with pytest.raises(BadInputError):
        preprocess(np.zeros((4, 4), np.float32), facts)
