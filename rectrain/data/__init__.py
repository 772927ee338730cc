"""From image files to uint8 batches on the host, in the order the data flows:

``index`` (which files are samples, their labels) -> ``scan`` (each image's upright size from its header, bad files,
the ``.npz`` cache; ``exif`` is the orientation rule every reader shares) -> ``buckets`` (a few (H, W) batch shapes,
an image's bucket) -> ``samplers`` (which images form each batch, and which rank trains it) -> ``transforms`` (decode
and crop one image to its bucket's shape, in a DataLoader worker) -> ``loader`` (the dataset, the epoch stream and the
DataLoaders; ``workers``: their processes; ``failures``: images that fail to decode mid-run) -> uint8 (B, H, W, 3).
``gpu_decode`` is the alternative last leg (``--decode gpu``): workers read bytes, the GPU decodes. ``synth`` and
``prepare`` write image folders (a synthetic one; a downscaled copy).
"""
