"""The shipped model families, one module each, holding every family-specific fact (components,
parent inputs, image facts, GGUF mmproj layout, fp16 safety, the text decoders it brings).

Adding a family is adding one module here with one Adapter subclass, and its name below."""

FAMILY_MODULES = (
    "edgemed.models.families.llava",
    "edgemed.models.families.idefics3",
    "edgemed.models.families.gemma3",
    "edgemed.models.families.decoder",
)
