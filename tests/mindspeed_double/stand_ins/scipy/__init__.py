"""A stand-in scipy: `mindspeed/core/context_parallel/utils.py:9` imports
scipy.sparse.linalg.eigsh at module level (context-parallel load balancing, never reached here)."""
