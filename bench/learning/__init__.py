"""The learning benchmark: does the stack learn text conditioning? (see bench/learning/run.py)"""
