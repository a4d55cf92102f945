"""facemeta.align"""
