"""ember.quant"""
