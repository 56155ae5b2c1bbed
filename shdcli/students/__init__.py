"""Students: deriving a smaller model from its teacher: importance measured on calibration batches
(pruning), the shape, kept parts and squeeze-consistent weight init (derive), and loading the teacher and
building a run's student and SHD plan from the recipe (build). May import the core
modules, attention/, models/ and tasks/ (the task says what a pruned model's output is compared by).
"""
