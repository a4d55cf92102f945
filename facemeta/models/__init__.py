"""facemeta.models"""
