"""``make demo``: both stages on Fashion-MNIST, a classifier, samples, figures, FID and a report."""
