"""ember.infer"""
