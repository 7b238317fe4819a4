"""ember.parallel"""
