"""ember.train"""
