"""edgemed: compress medical multimodal LLMs into verified edge artifacts and measure them.

    import edgemed
    result = edgemed.compress("path/or/hub-id", recipes=["int4"], target="jetson-orin-nano-8gb", output="out/")
    session = edgemed.runtime.load("out/")
    print(session.generate(image="cxr.dcm", prompt="Is there a pleural effusion?").text)

Importing edgemed is cheap and torch-free; heavy modules load on first use.
"""
from __future__ import annotations

from edgemed._version import __version__


def __getattr__(name):
    if name == "compress":
        from edgemed.pipeline import compress

        return compress
    if name == "plan":
        from edgemed.plan import plan

        return plan
    if name == "load_recipe":
        from edgemed.recipe import load_recipe

        return load_recipe
    if name == "load_target":
        from edgemed.target import load_target

        return load_target
    if name == "runtime":
        import edgemed.runtime as runtime

        return runtime
    raise AttributeError(name)


__all__ = ["__version__", "compress", "plan", "load_recipe", "load_target", "runtime"]
