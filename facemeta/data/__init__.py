"""Data: manifests, readers of the shared face sets, training datasets and samplers."""
