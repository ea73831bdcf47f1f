"""Prefix for `python -c` scripts that must run where torch and transformers cannot be imported
(the on-device runtime extra): any import of either raises ImportError."""

BLOCK_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, _Block())
"""
