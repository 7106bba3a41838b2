"""Task models used functionally (parameters passed in): MLP, Conv-4, ResNet-12, a linear classifier head, and
batch norm with each task's own statistics."""
