"""facemeta.train"""
