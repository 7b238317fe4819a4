"""ember.peft"""
