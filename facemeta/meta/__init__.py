"""facemeta.meta"""
