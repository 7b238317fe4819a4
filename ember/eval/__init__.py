"""ember.eval"""
