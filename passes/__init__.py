"""Graph passes: each turns a TransformerSpec plus options into resize plans for the shared engine."""
