"""Pure rendering functions: tensors in, images out. Nothing here runs a model."""
