"""The interleaved-thinking agent: tools (tools.py), and the loop and protocol clients beside them."""
