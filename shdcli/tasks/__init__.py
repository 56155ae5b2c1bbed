"""Tasks: one module per kind of work (causal_lm, encoder, image) behind the protocol in base.py,
and the registry that names them. Tasks may import the core modules (errors, report, recipe,
distributed), attention/ and models/; never students/, train, evaluate, heads or the CLI.
"""
