"""Students: deriving a smaller model from its teacher: importance measured on calibration batches
(pruning) and the shape, kept parts and squeeze-consistent weight init (derive). May import the core
modules, attention/, models/ and tasks/ (the task says what a pruned model's output is compared by).
"""
