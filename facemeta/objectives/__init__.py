"""facemeta.objectives"""
