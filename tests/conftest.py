import os
import sys

# Tests import the shared tiny-model factory as `tiny_models`.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
