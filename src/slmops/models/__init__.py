"""slmops.models"""
