"""Writers of nnU-Net raw datasets with center/vendor metadata: one module per source."""
