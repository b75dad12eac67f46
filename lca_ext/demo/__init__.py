"""The demo: the paper's MNIST networks on 5,000 real digits, tracked with LCA."""
