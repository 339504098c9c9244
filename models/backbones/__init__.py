"""Backbones in torchvision state-dict layout (ResNet-18/50, VGG16/19) so that users' pretrained weights load."""
