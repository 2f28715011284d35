"""compress: an edge-deployment compression compiler.

A teacher model goes in; a distilled, quantized, exported, benchmarked build per
target comes out. See README.md for the flow and DESIGN.md for the contract.
"""

__version__ = "0.1.0"
