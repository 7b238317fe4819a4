"""ember.recipes"""
