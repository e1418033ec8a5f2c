"""slmops.demo"""
