"""ember.data"""
