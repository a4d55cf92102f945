"""facemeta.gallery"""
