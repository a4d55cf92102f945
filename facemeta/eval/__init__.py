"""facemeta.eval"""
