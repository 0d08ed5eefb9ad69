"""SMoG's multi-crop augmentations: per_image (torchvision, in the loader's workers) and on_device (whole
batches on the training device, data.augment_on=device), one recipe."""
