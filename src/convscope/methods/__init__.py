"""Attribution: class activation maps, gradient saliency and their sanity checks."""
