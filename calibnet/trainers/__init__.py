"""nnUNetTrainer subclasses: one module per method family. Imports here stay side-effect free because
nnU-Net imports every module of an external trainer folder while looking a class up by name."""
