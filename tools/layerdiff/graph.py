"""The layer graph lives in conformance/graph.py: the conformance report names the layer of a
failing tensor with it too (one graph for the matrix and the debugger). Re-exported here."""
from conformance.graph import LAYER_FILES, PARAM_ROLES, Node, culprits, nodes, where  # noqa: F401
