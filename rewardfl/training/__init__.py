"""Training: the loop and the parts it is made of.

* ``policy``: which sampling steps run, carry gradient and use which expert.
"""
