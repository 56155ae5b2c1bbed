"""Models: what families call their parts (families: shapes, blocks, attention projections), where models
come from and go to (sources), and what SHD plans over them (mapping: layer pairs and head groups;
grouping: calibrated groups; checks; lora; st_modules). May import the core modules and attention/.
"""
