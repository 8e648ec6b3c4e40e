"""The torch layer both stages stand on: the feature map (defined once), reading tensor files, the device,
process memory and the collectives under torchrun. It reads no data; stages 1, 2 and 3 import it."""
