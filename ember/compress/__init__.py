"""ember.compress"""
