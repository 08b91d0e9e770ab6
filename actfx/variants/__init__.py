"""Compressed-save variants: autograd Functions whose forward is the original op and whose
backward reads packed values. The rewrite pass (actfx/passes) calls them from fx graphs."""
