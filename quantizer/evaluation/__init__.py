"""Evaluation and training: the Fashion-MNIST data, the FD feature extractor, FD/PSNR metrics, model training."""
