"""ember.serve"""
